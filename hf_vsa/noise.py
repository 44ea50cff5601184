"""How much of a step's gradient is the mean, and how much is minibatch noise, measured online.

A minibatch gradient of B examples is the mean gradient G plus noise of covariance Sigma / B. The
gradient noise scale B_noise = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training") says where that changes: the mean's share of the expected squared norm is

    kappa = |G|^2 / E|g_B|^2 = 1 / (1 + B_noise / B),

which is also the expected squared cosine of g_B with G. A prediction p is at least as well aligned
with G as a backward would be when cos(p, G) >= sqrt(kappa); as noise is uncorrelated with p,
the cosine of p with the measured g_B is cos(p, G) * sqrt(kappa), so the test the controller
makes is cos(p, g_B) >= kappa.

With n > 1 gradients of b examples each per optimizer step (micro-batches of gradient
accumulation, times ranks), appendix A of the paper gives unbiased estimates of |G|^2 and tr(Sigma)
from two batch sizes: the squared norms of the micro-batch gradients (batch b) and of the step's
accumulated gradient (batch n b). Both are norms of gradients the step computes anyway: no extra
backward. With one gradient per step (n = 1) there is no second batch size; then kappa is read
from the lag-1 cosine of consecutive backprop steps' gradients, whose expectation is kappa while G
changes slowly between them.
"""
import torch

from .blocks import Consistency

_SMOOTH = 16  # running means over about the last 16 measurements (noisy single-step estimates)


def noise_terms(small_sq, big_sq, b_small, b_big):
    """Unbiased |G|^2 and tr(Sigma) from E|g|^2 at batch b_small (small_sq, e.g. the mean over
    micro-batches) and at batch b_big (big_sq): E|g_b|^2 = |G|^2 + tr(Sigma) / b."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def mean_share(g2, trace, batch):
    """kappa = |G|^2 / (|G|^2 + tr(Sigma) / batch), clamped to [0, 1] (the estimates are noisy)."""
    if g2 <= 0:
        return 0.0
    return min(1.0, g2 / (g2 + max(trace, 0.0) / batch))


class NoiseScale:
    """Running estimates for one run: `accum` micro-batches of `batch` examples per optimizer step on
    each of `world` ranks, so micro = accum * world gradients of batch b per step.

    Micro-batch gradients are read by tensor hooks before they accumulate into .grad (local to the
    rank under DDP, hence the cross-rank mean at the host read); the hooks count only while
    `listening` (backprop steps). Device tensors only until estimate(), a host sync."""

    def __init__(self, params, accum, world, batch, device, seed=0):
        self.accum, self.micro, self.batch = accum, accum * world, batch
        micro = self.micro
        self.listening = False
        self.step_sq = torch.zeros((), dtype=torch.float64, device=device)  # this step's micro-batch |a_k|^2
        self.small = torch.zeros((), dtype=torch.float64, device=device)  # running mean of mean |g_micro|^2
        self.big = torch.zeros((), dtype=torch.float64, device=device)  # running mean of |G_step|^2
        self.measured = 0
        self.handles = []
        if micro > 1:
            self.handles = [p.register_hook(self._hook) for p in params if p.requires_grad]
        # n = 1: the whole model's lag-1 gradient cosine, on a fixed random sample of each tensor
        self.lag1 = Consistency([list(params)], device, seed) if micro == 1 else None

    def _hook(self, grad):
        if self.listening:
            self.step_sq += grad.detach().float().pow(2).sum().double()
        return None  # the gradient itself is unchanged

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def observe(self, step, grads):
        """After the last micro-batch of backprop step `step`: `grads`, the accumulated (synchronised)
        gradient of every tracked tensor. The micro-batch gradients a_k add up to it as a mean does
        (the Trainer scales each micro-batch's loss by 1/K), so K * a_k is a micro-batch's gradient
        on the scale of the mean."""
        if self.lag1 is not None:
            self.lag1.update(step)
            self.measured = self.lag1.measured
            return
        big = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        k = self.accum
        small = self.step_sq * k  # mean over this rank's k micro-batches of |k a|^2 = k * sum |a|^2
        self.step_sq = torch.zeros_like(self.step_sq)
        ok = big.isfinite() & small.isfinite()  # an overflowed fp16 step measures nothing
        self.measured += 1
        w = 1.0 / min(self.measured, _SMOOTH)
        self.small = torch.where(ok, self.small + w * (small - self.small), self.small)
        self.big = torch.where(ok, self.big + w * (big - self.big), self.big)

    def estimate(self, reduce_mean=None):
        """(kappa, noise scale in examples, batch over noise scale), host floats; NaN before any
        measurement. A host sync: call at decision points and logging steps only."""
        nan = float("nan")
        if self.measured == 0:
            return nan, nan, nan
        if self.lag1 is not None:
            c = self.lag1.mean[0].item()  # host sync
            kappa = min(1.0, max(0.0, c))
            ratio = kappa / (1 - kappa) if kappa < 1 else float("inf")
            return kappa, (self.batch / ratio if ratio > 0 else float("inf")), ratio
        small = self.small if reduce_mean is None else reduce_mean(self.small)
        small, big = small.item(), self.big.item()  # host sync
        g2, trace = noise_terms(small, big, 1.0, float(self.micro))
        kappa = mean_share(g2, trace, self.micro)
        if g2 <= 0:
            return kappa, float("inf"), 0.0
        b_noise = max(trace, 0.0) / g2 * self.batch  # in examples
        return kappa, b_noise, (self.micro * self.batch / b_noise if b_noise > 0 else float("inf"))

    def state_dict(self) -> dict:
        s = {"small": self.small, "big": self.big, "measured": self.measured, "micro": self.micro}
        if self.lag1 is not None:
            s.update({f"lag1_{k}": v for k, v in self.lag1.state_dict().items()})
        return s

    def load_state_dict(self, state: dict) -> bool:
        """Restore saved measurements; False (nothing restored, the measurement starts afresh) where the
        state was measured with another number of gradients per step (gradient accumulation steps x
        processes): its norms are of other batch sizes. Any other mismatch is refused."""
        if state.get("micro") != self.micro:
            return False
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"noise-scale state keys differ: missing {sorted(expected - set(state))}, unexpected "
                             f"{sorted(set(state) - expected)} (the gradient accumulation steps or the world size "
                             "changed since the checkpoint?)")
        if self.lag1 is not None:
            self.lag1.load_state_dict({k[len("lag1_"):]: v for k, v in state.items() if k.startswith("lag1_")})
        self.small = state["small"].to(self.small.device, self.small.dtype)
        self.big = state["big"].to(self.big.device, self.big.dtype)
        self.measured = int(state["measured"])
        return True
