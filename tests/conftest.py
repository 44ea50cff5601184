"""Tiny real models and data for the tests (scripts/tasks.py builds them; no hub, no network)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from tasks import tiny_dataset as make_dataset, tiny_model as make_model  # noqa: E402,F401


@pytest.fixture
def train_data():
    return make_dataset(256, seed=0)
