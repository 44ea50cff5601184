"""Tiny real models and data for the tests (scripts/tasks.py builds them; no hub, no network)."""
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from tasks import tiny_dataset as make_dataset, tiny_model as make_model  # noqa: E402,F401


@pytest.fixture
def train_data():
    return make_dataset(256, seed=0)


class Probe:
    """The probe's sample (hf_vsa.probe.probe_windows) and its stand-in, one flat tensor shaped like it, for a
    GradientPredictor to track outside the engine."""

    def __init__(self, params, fraction, seed, align=1):
        from hf_vsa.probe import probe_windows
        self.windows = probe_windows(params, fraction, seed, align)
        self.stand_ins = [params[0].new_zeros(1, dtype=torch.float32).expand(self.windows.numel)]

    def sample(self, grads):
        return [self.windows.gather(grads)]


class BackwardCounter(TrainerCallback):
    """Counts real backward passes with autograd hooks, per optimizer step."""

    def __init__(self, param):
        self.calls, self.per_step = 0, []
        param.register_post_accumulate_grad_hook(lambda p: setattr(self, "calls", self.calls + 1))

    def on_step_end(self, args, state, control, **kw):
        self.per_step.append(self.calls)
        self.calls = 0
