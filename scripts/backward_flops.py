"""The backward FLOPs a benchmark run actually ran, counted.

During the run, `BackwardLog` notes every backward that runs (a wrapper around the trainer's
`accelerator.backward`, and around DropBP's one-example sensitivity passes): the examples in its
batch and, under DropBP, the residual branches its forward dropped. Nothing is counted on the
clock: after the run, torch's FlopCounterMode counts, for each distinct set of dropped branches
noted, one backward of the trained model on one training example with those branches dropped
(matrix multiplies and attention; elementwise ops count 0 there). Each noted set is counted as a
whole, not as a sum of per-branch shares: with LoRA, a branch's backward needs its input's gradient
only where an earlier branch ran its backward, so the shares do not add. Blocks are a fixed length,
so a backward's FLOPs are its examples times one example's. hf_vsa's partial backward (a backward
that stops early) is not modelled: a run with one gets None.
"""
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode


class BackwardLog:
    """Installed on a trainer before its run (scripts/benchmark.py)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.events = Counter()  # (examples, dropped branch indices) -> backwards run
        self.partial = 0  # hf_vsa backwards that stop early
        self.examples = None  # the batch of the last forward
        compute_loss, backward = trainer.compute_loss, trainer.accelerator.backward

        def noting_loss(model, inputs, *a, **kw):
            self.examples = inputs["input_ids"].shape[0]
            return compute_loss(model, inputs, *a, **kw)

        def noting_backward(loss, **kw):
            if loss.requires_grad:  # DropBP with every branch dropped runs none
                engine = getattr(trainer, "vsa", None)
                if engine is not None and engine.partial and engine.phase.name == "PREDICT":
                    self.partial += 1
                self.events[(self.examples, self._dropped())] += 1
            return backward(loss, **kw)
        trainer.compute_loss, trainer.accelerator.backward = noting_loss, noting_backward
        grad_norms = getattr(trainer, "_grad_norms", None)
        if grad_norms is not None:  # DropBP's sensitivity passes: one example, one branch dropped (or none)
            def noting_norms(model, one):
                self.events[(one["input_ids"].shape[0], tuple(sorted(trainer.forced)))] += 1
                return grad_norms(model, one)
            trainer._grad_norms = noting_norms

    def _dropped(self):
        dropped = getattr(self.trainer, "dropped", None)
        return tuple(k for k, d in enumerate(dropped) if d) if dropped is not None else ()

    def total(self):
        """Backward FLOPs of the whole run, or None (a partial backward ran); call once it has ended."""
        if self.partial:
            return None
        per_example = count_backward(self.trainer, {dropped for _, dropped in self.events})
        return sum(n * ex * per_example[dropped] for (ex, dropped), n in self.events.items())


def count_backward(trainer, dropped_sets=((),)):
    """{dropped: backward FLOPs of one training example through the trainer's model with DropBP's branches
    `dropped` dropped (the others kept; no DropBP: the whole backward)}, one count per set."""
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    one = {k: v[:1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    held = getattr(trainer, "forced", None)
    model.train()
    out = {}
    try:
        for dropped in dropped_sets:
            if hasattr(trainer, "forced"):
                trainer.forced = frozenset(dropped)
            with FlopCounterMode(display=False) as fc:
                loss = model(**one).loss
                forward = fc.get_total_flops()
                if loss.requires_grad:
                    loss.backward()
                out[dropped] = fc.get_total_flops() - forward
            model.zero_grad(set_to_none=True)
    finally:
        if hasattr(trainer, "forced"):
            trainer.forced = held
        model.zero_grad(set_to_none=True)
    return out
