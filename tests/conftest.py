"""Tiny real models and data for the tests: a 2-layer BERT classifier built from a config, on a
token-classification-by-rule dataset the tests make themselves (no hub, no network)."""
import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

VOCAB, SEQ = 64, 12


def make_dataset(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    # Label: does the sequence hold more "high" tokens than "low" ones? Learnable in a few steps.
    labels = ((ids >= VOCAB // 2).sum(1) > SEQ // 2).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": labels.tolist()})


def make_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=2)
    return BertForSequenceClassification(cfg)


@pytest.fixture
def train_data():
    return make_dataset(256, seed=0)


@pytest.fixture
def eval_data():
    return make_dataset(64, seed=1)
