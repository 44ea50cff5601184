"""Counting instead of timing: the ops (GPU kernel launches) and host syncs a training step dispatches.

On 2 CPU cores time is noisy and says little about a GPU; the number of aten ops a step dispatches
and the number of host syncs (`aten::_local_scalar_dense`: every `.item()`, `bool(t)`, `.tolist()`
element; `aten::nonzero`: a data-dependent shape) are exact, and each is a kernel launch or a drained
GPU queue there. `OpCounter` is a `TorchDispatchMode` that counts them, views excluded, and splits
them into hf_vsa's own and everything else by the Python stack at dispatch time: an op is hf_vsa's
when the innermost frame of hf_vsa lies deeper than the innermost frame of transformers, accelerate,
torch.optim or torch.autograd (so the Trainer's forward, backward and optimizer, called through
VSATrainer.training_step, stay the Trainer's; hf_vsa's tensor hooks, called inside the backward, are
hf_vsa's). `.tolist()` is counted as a sync too (on CUDA it copies to the host and waits; on CPU
it dispatches no op, so the mode patches it while it is on); hf_vsa reads tensors made on the host
through `flat.host_list`, which is not. `StepCounts` is a TrainerCallback that reads the counters at each optimizer step's end.
Used by the tests (tests/test_counting.py) and scripts/diagnostics/count_ops.py.
"""
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

_OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep
_FOREIGN = tuple(os.sep + p + os.sep for p in ("transformers", "accelerate", os.path.join("torch", "optim"),
                                                os.path.join("torch", "autograd"), "peft", "trl"))
SYNCS = ("aten::_local_scalar_dense", "aten::nonzero")


def _owner():
    """'vsa' or 'other', from the innermost frames of the current Python stack."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_OWN) and not name.endswith("counting.py"):
            return "vsa"
        if any(p in name for p in _FOREIGN):
            return "other"
        f = f.f_back
    return "other"


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops (views excluded) and host syncs, split by owner: hf_vsa or other."""

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self):
        self.ops = {"vsa": 0, "other": 0}
        self.syncs = {"vsa": 0, "other": 0}
        self.sync_names = []  # (owner, op name) of each sync, for a failing test's message

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter, tolist = self, self._tolist

        def counted(t):
            who = _owner()
            counter.syncs[who] += 1
            counter.sync_names.append((who, "Tensor.tolist"))
            return tolist(t)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            who = _owner()
            self.ops[who] += 1
            if func._schema.name in SYNCS:
                self.syncs[who] += 1
                self.sync_names.append((who, func._schema.name))
        return func(*args, **(kwargs or {}))


class StepCounts(TrainerCallback):
    """Per optimizer step, (phase name or 'trainer', hf_vsa ops, other ops, hf_vsa syncs, other syncs),
    read from `counter` at each step's end (and at its start, so what happens between steps, logging
    or evaluation, is left out). `trainer`: the VSATrainer whose engine says the phase (None: plain)."""

    def __init__(self, counter, trainer=None):
        self.counter, self.trainer, self.rows = counter, trainer, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.reset()

    def on_step_end(self, args, state, control, **kwargs):
        c = self.counter
        vsa = getattr(self.trainer, "vsa", None) if self.trainer is not None else None
        phase = "trainer" if vsa is None or vsa.phase is None else vsa.phase.name
        self.rows.append((phase, c.ops["vsa"], c.ops["other"], c.syncs["vsa"], c.syncs["other"]))
        c.reset()


def count_training(trainer, counter=None):
    """Train `trainer` under an OpCounter; returns the StepCounts rows."""
    counter = counter or OpCounter()
    from .trainer import VSAMixin
    steps = StepCounts(counter, trainer if isinstance(trainer, VSAMixin) else None)
    trainer.add_callback(steps)
    try:
        with counter:
            trainer.train()
    finally:
        trainer.remove_callback(steps)
    return steps.rows


def peak_rss_bytes():
    """This process's peak resident memory (VmHWM), bytes; None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
