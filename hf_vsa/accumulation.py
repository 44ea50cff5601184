"""Adaptive accumulation: the micro-batches each optimizer step computes, from the measured noise scale.

With gradient_accumulation_steps = K > 1, a step runs the forward and backward of only its last m
micro-batches (the last one always, so that DDP synchronises as usual) and rescales their sum by
K / m, m chosen by policy.micro_batches_needed. Decided from the second measured step on, WARMUP
included: early in training the mean dominates the gradient and the noise scale is small, so this is
a batch-size ramp taken from measurement. Host integers only; no tensor is read.

Ternary accumulation (TernaryAccumulator, vsa_ternary_accumulation): the micro-batches' gradients kept
as unbiased stochastic ternary codes between micro-batches instead of full precision.
"""
import torch

from .compress import dequantize, mix_seed, ternary_pack
from .policy import micro_batches_needed

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


class TernaryAccumulator:
    """Gradient accumulation in ternary: while a micro-batch's backward runs, each parameter's
    fresh gradient is replaced, the moment autograd finishes it, by stochastically rounded ternary
    codes (unbiased, 2 bits per element plus block scales, seeded by (seed, step, micro-batch,
    tensor)), so no full-precision .grad lives between micro-batches. In the last micro-batch the
    stored codes are added back into each .grad as it is produced, so the optimizer sees
    sum_k g_k + error with E[error] = 0 and, per block of scale s (max |g| of that block),
    E[error^2] = sum |g| (s - |g|) over the rounded micro-batches' elements."""

    def __init__(self, params, block=256, seed=0):
        self.params, self.block, self.seed = list(params), block, seed
        self.entries = [[] for _ in self.params]  # per tensor: [(packed codes, scales)]

    def _compress(self, i, step, micro):
        p = self.params[i]
        gen = torch.Generator(device=p.device)
        gen.manual_seed(mix_seed(self.seed, 2, step, micro, i))
        self.entries[i].append(ternary_pack(p.grad, self.block, gen))
        p.grad = None  # the full-precision gradient is not kept

    def _restore(self, i):
        p = self.params[i]
        if not self.entries[i]:
            return
        total = sum(dequantize(c, s, p.numel(), self.block) for c, s in self.entries[i]).view_as(p).to(p.dtype)
        self.entries[i].clear()
        if p.grad is None:
            p.grad = total
        else:
            p.grad.add_(total)

    def micro_batch(self, step, micro, last):
        """Context manager around one micro-batch's forward+backward."""
        acc = self

        class _Hooks:
            def __enter__(self):
                def hook(i):
                    if last:
                        return lambda p: acc._restore(i)
                    return lambda p: acc._compress(i, step, micro)
                self.handles = [p.register_post_accumulate_grad_hook(hook(i))
                                for i, p in enumerate(acc.params) if p.requires_grad]
                return self

            def __exit__(self, *exc):
                for h in self.handles:
                    h.remove()
                if last:  # tensors that got no gradient in the last micro-batch
                    for i in range(len(acc.params)):
                        acc._restore(i)
                return False
        return _Hooks()
