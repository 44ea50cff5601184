"""Adaptive accumulation: the micro-batches each optimizer step computes, from the measured noise scale.

With gradient_accumulation_steps = K > 1, a step runs the forward and backward of only its last m
micro-batches (the last one always, so that DDP synchronises as usual) and rescales their sum by
K / m, m chosen by noise.micro_batches_needed. Decided from the second measured step on, WARMUP
included: early in training the mean dominates the gradient and the noise scale is small, so this is
a batch-size ramp taken from measurement. Host integers only; no tensor is read.
"""
import torch

from .noise import micro_batches_needed

# Steps whose noise scale was measured before the micro-batches are decided from it: one step's
# estimate is unbiased but noisy, and a scale read low would drop micro-batches the step needs.
MIN_MEASURED = 2


class AdaptiveAccumulation:
    def __init__(self, accum, world, batch, tolerance, enabled=True):
        self.accum, self.world, self.batch, self.tolerance = accum, world, batch, tolerance
        self.enabled = enabled and accum > 1
        self.target = accum  # micro-batches each step computes from now on
        self.index = self.run = 0  # this step: micro-batches seen, and computed
        self.items = None  # this step: the computed micro-batches' items (label tokens), when counted
        self.seen = self.computed = 0  # the run's totals, over steps that computed any

    def new_step(self):
        self.index = self.run = 0
        self.items = None

    def decide(self, noise_scale: float):
        """`noise_scale`: B_noise in examples (NaN: not measured, keeps all K)."""
        if self.enabled:
            noise = noise_scale / (self.batch * self.world)  # in micro-batches over all ranks
            fewest = 2  # two computed micro-batches a step keep the noise scale measured (noise.py)
            self.target = micro_batches_needed(noise, self.accum, fewest, self.tolerance)

    def take(self, last: bool) -> bool:
        """Whether this micro-batch runs its forward and backward."""
        i = self.index
        self.index += 1
        run = last or i >= self.accum - self.target
        self.run += run
        self.seen += 1
        self.computed += run
        return run

    def count(self, items):
        """A computed micro-batch's items (label tokens, as the Trainer counts them for its loss scaling)."""
        self.items = items if self.items is None else self.items + items

    def rescale(self, params, k_step: int, total_items=None) -> float:
        """After the last computed micro-batch: the accumulated gradients, a sum over `run` of the step's
        k_step micro-batches, rescaled to their mean's scale. Where the Trainer scaled each micro-batch's
        loss by the step's `total_items` (label tokens of all k_step micro-batches, a device tensor),
        the factor is total_items over the computed ones' items (counted, on the device: micro-batches
        of SFT with padding or completion-only loss hold unequal counts); else k_step / run. Returns it."""
        if self.run >= k_step:
            factor = 1.0
        elif total_items is not None and self.items is not None:
            factor = (total_items / self.items.clamp_min(1)).float()
        else:
            factor = k_step / max(self.run, 1)
        self.items = None
        if not (isinstance(factor, float) and factor == 1.0):
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor)
        return factor
