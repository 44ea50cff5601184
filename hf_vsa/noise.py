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


def squared_norms(tensors):
    """Per tensor |x|^2 in float64, the norms taken in float32 (bf16 gradients' norms in bf16 lose digits):
    one _foreach_norm over all of them."""
    try:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    except TypeError:  # (torch before the dtype argument)
        norms = torch._foreach_norm([t.float() for t in tensors])
    return torch.stack(norms).double().square()

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
    each of `world` ranks, so up to accum * world gradients of batch b per step (fewer where adaptive
    accumulation computes fewer micro-batches: each step's estimate uses its own count).

    The two batch sizes are read from .grad itself, with no hook: after the step's first computed
    micro-batch, .grad is one micro-batch's gradient (rank-local: DDP synchronises only the last
    micro-batch); after the last, the step's mean over all ranks. Their squared norms, per tensor,
    are one `_foreach_norm` each, whatever the number of tensors (a hook per tensor cost 5 ops per
    tensor per micro-batch). One micro-batch's norm is as unbiased as the mean of all of theirs,
    only noisier, and the running mean over _SMOOTH steps absorbs that. With one micro-batch per step
    (no gradient accumulation) the lag-1 cosine stands in. Device tensors only until estimate()."""

    def __init__(self, params, accum, world, batch, device, seed=0):
        self.accum, self.world, self.micro, self.batch = accum, world, accum * world, batch
        self.listening = False
        params = list(params)
        # Per tensor: running means of the per-step unbiased |G|^2 and tr(Sigma) (micro-batch units),
        # rank-local: each is linear in this rank's micro-batch norms, so their cross-rank mean is the
        # global estimate.
        self.first_sq = None  # this step: per tensor |a_1|^2 of its first computed micro-batch
        self.g2 = torch.zeros(len(params), dtype=torch.float64, device=device)
        self.trace = torch.zeros(len(params), dtype=torch.float64, device=device)
        self.measured = 0
        # one gradient per step: the whole model's lag-1 gradient cosine, on a fixed random sample of each tensor
        self.lag1 = Consistency([list(params)], device, seed) if accum == 1 else None

    def first(self, grads):
        """After the first computed micro-batch of a backprop step (not its last): `grads`, .grad now."""
        if self.listening and self.lag1 is None:
            self.first_sq = squared_norms(grads)

    def observe(self, step, grads, computed=None, scale=1.0):
        """After the last micro-batch of backprop step `step`: `grads`, the step's accumulated
        (synchronised) gradient of every tracked tensor, a mean over the `computed` micro-batches
        (None: all) of each rank; `scale`, the factor the caller rescaled it by to make it one (K / m
        under adaptive accumulation). The Trainer scales each micro-batch's loss by 1/K, so
        K * a_k is a micro-batch's gradient on the scale of the mean."""
        if self.lag1 is not None:
            self.lag1.update(step)
            self.measured = self.lag1.measured
            return
        m = self.accum if computed is None else computed
        n = m * self.world  # gradients of one micro-batch in this step, over all ranks
        sq, self.first_sq = self.first_sq, None
        if n < 2 or m < 2 or sq is None:  # no micro-batch norm before the last: no second batch size
            return
        big = squared_norms(grads)
        small = sq * self.accum ** 2  # |K a_1|^2: one micro-batch's gradient on the mean's scale
        big = big * (self.accum / m / scale) ** 2  # grads = scale * sum a_k; the mean of the K a_k is K/m * sum a_k
        g2, trace = noise_terms(small, big, 1.0, float(n))
        ok = (g2.sum() + trace.sum()).isfinite()  # an overflowed fp16 step measures nothing
        self.measured += 1
        w = 1.0 / min(self.measured, _SMOOTH)
        self.g2 = torch.where(ok, self.g2 + w * (g2 - self.g2), self.g2)
        self.trace = torch.where(ok, self.trace + w * (trace - self.trace), self.trace)

    def totals(self):
        """[|G|^2, tr(Sigma)] summed over tensors (or [lag-1 cosine, 0]), a device tensor for Deferred."""
        if self.lag1 is not None:
            return torch.stack([self.lag1.mean[0], torch.zeros_like(self.lag1.mean[0])])
        return torch.stack([self.g2.sum(), self.trace.sum()])

    def from_totals(self, values):
        """(kappa, noise scale in examples, full batch over it) from totals() read on the host."""
        nan = float("nan")
        if self.measured == 0 or values is None:
            return nan, nan, nan
        if self.lag1 is not None:
            kappa = min(1.0, max(0.0, values[0]))
            ratio = kappa / (1 - kappa) if kappa < 1 else float("inf")
            return kappa, (self.batch / ratio if ratio > 0 else float("inf")), ratio
        g2, trace = values
        kappa = mean_share(g2, trace, self.micro)
        if g2 <= 0:
            return kappa, float("inf"), 0.0
        b_noise = max(trace, 0.0) / g2 * self.batch  # in examples
        return kappa, b_noise, (self.micro * self.batch / b_noise if b_noise > 0 else float("inf"))

    def estimate(self, reduce_mean=None):
        """(kappa at the full batch, noise scale in examples, full batch over noise scale), host
        floats; NaN before any measurement. A host sync (and under DDP a collective: every rank
        calls it at the same points): logging steps and the model card only; decisions read
        totals() through the engine's Deferred instead."""
        if self.measured == 0:
            return self.from_totals(None)
        both = self.totals()
        return self.from_totals((both if reduce_mean is None else reduce_mean(both)).tolist())  # host sync

    def group_share(self, owner, n_groups):
        """Per group (`owner`: per tensor its group, n_groups for none; a device long tensor), kappa at the
        full batch: a device tensor of n_groups, from segment sums (one index_add_, not one per group);
        None where there are no micro-batch measurements (one gradient a step). Rank-local."""
        if self.lag1 is not None or not n_groups:
            return None
        both = torch.zeros(2, n_groups + 1, dtype=torch.float64, device=self.g2.device)
        both.index_add_(1, owner, torch.stack([self.g2, self.trace]))
        g2, trace = both[0, :-1], both[1, :-1].clamp_min(0.0)
        share = g2 / (g2 + trace / self.micro).clamp_min(1e-300)
        return torch.where(g2 > 0, share.clamp(0.0, 1.0), torch.zeros_like(share))

    def state_dict(self) -> dict:
        s = {"g2": self.g2, "trace": self.trace, "measured": self.measured, "micro": self.micro}
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
        self.g2 = state["g2"].to(self.g2.device, self.g2.dtype)
        self.trace = state["trace"].to(self.trace.device, self.trace.dtype)
        self.measured = int(state["measured"])
        return True
