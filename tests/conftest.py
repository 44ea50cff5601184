"""Tiny real models and data for the tests (scripts/tasks.py builds them; no hub, no network)."""
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from tasks import tiny_dataset as make_dataset, tiny_model as make_model  # noqa: E402,F401


@pytest.fixture
def train_data():
    return make_dataset(256, seed=0)


class BackwardCounter(TrainerCallback):
    """Counts real backward passes with autograd hooks, per optimizer step."""

    def __init__(self, param):
        self.calls, self.per_step = 0, []
        param.register_post_accumulate_grad_hook(lambda p: setattr(self, "calls", self.calls + 1))

    def on_step_end(self, args, state, control, **kw):
        self.per_step.append(self.calls)
        self.calls = 0
