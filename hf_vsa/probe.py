"""Measure a prediction on a sample of each tensor before paying for it in full.

The gate (vsa_min_cosine) admits a tensor's prediction only once CORRECT steps have measured its
cosine with the actual gradient, and retires the tensors it keeps out. Measured on our tasks, it
keeps out most of them: paying for a full compressed history of every tensor until then is most
of what the first cycle costs on a large model. A cosine needs far fewer elements than the
tensor has to be measured: so the predictor first runs on a fixed sample of whole blocks of each
tensor (`vsa_probe_fraction` of them, at least MIN_BLOCKS), and only the tensors still tracked
when the first cycle's measurements are in get a full history (see VSAEngine.end_probe).

Some gradients hold their energy in a few blocks (the rows of frequent tokens in an embedding or
LM head, a few attention heads). A uniform sample misses those blocks, and its cosine then
measures the rest of the tensor. So the sample is drawn at the first record, with inclusion
probability pi_b growing with block b's energy in that gradient (half proportional to it, half
uniform, so every block can be drawn and no weight exceeds twice the uniform one), the heaviest
blocks with certainty; each sampled block is scaled by 1/sqrt(pi_b). Inner products and squared
norms of the scaled samples are then unbiased (Horvitz-Thompson) estimates of the whole tensors',
and so are the cosines and trust factors computed from them, to first order.

The draw is systematic sampling over a seeded random order of the blocks: exactly k blocks, with
exactly those probabilities. It depends on the seed and the first recorded gradient, which a
resume no longer has: the indices and scales are saved in checkpoints (state_dict).
"""
import math

import torch

from .compress import mix_seed

# A tensor of at most this many blocks is probed whole. 16 blocks of 256 elements: the cosine of two
# unrelated 4096-element vectors has a standard deviation of 1/64 (0.016), well below the gate's 0.2.
MIN_BLOCKS = 16


def inclusion_probabilities(energy, k: int):
    """pi_b = min(1, c * w_b) with w = (energy / sum + 1 / n) / 2 and c such that sum(pi) = k: the
    blocks whose share would exceed 1 are taken with certainty, the others share the rest."""
    n = energy.numel()
    e = energy.double()
    total = e.sum()
    w = torch.where(total > 0, 0.5 * e / total.clamp_min(1e-300), 0.0) + 0.5 / n
    ws, order = w.sort(descending=True)
    tail = ws.flip(0).cumsum(0).flip(0)  # tail[m]: sum of the weights of the blocks after the m heaviest
    m = torch.arange(n, device=w.device)
    # The m heaviest blocks are certain where the (m+1)-th heaviest, given its share of what is left, fits:
    # the first such m (every m >= k qualifies).
    fits = (k - m) * ws <= tail
    certain = fits.int().argmax()  # device tensor: no host sync
    c = (k - certain).double() / tail[certain]
    pi_sorted = torch.where(m < certain, 1.0, (c * ws).clamp(max=1.0))
    return torch.empty_like(pi_sorted).scatter_(0, order, pi_sorted)


def systematic_sample(pi, k: int, gen):
    """k indices drawn with inclusion probabilities `pi` (summing to k): points u, u+1, ..., u+k-1 on
    the cumulative sum of pi over a random order of the blocks. Sorted, on pi's device."""
    n = pi.numel()
    order = torch.randperm(n, generator=gen).to(pi.device)
    start = torch.rand((), generator=gen, dtype=torch.float64).item()  # host generator: no device sync
    cum = pi[order].cumsum(0)
    points = start + torch.arange(k, dtype=torch.float64, device=pi.device)
    # (a rounding error in cum can at worst pick a neighbour twice; the sample keeps its size k)
    pos = torch.searchsorted(cum, points, right=True).clamp_(max=n - 1)
    return order[pos].sort().values


class Probe:
    """Per tensor, the sorted indices of the whole blocks it samples and their scales 1/sqrt(pi) (both
    None: the whole tensor; drawn at the first sample() call), and a stand-in tensor shaped like the
    sample (one element allocated) for the predictor to track."""

    def __init__(self, params, fraction, block, seed):
        self.block, self.seed, self.sizes, self.whole, self.stand_ins = block, seed, [], [], []
        for p in params:
            whole = p.numel() // block
            self.whole.append(whole)
            k = max(MIN_BLOCKS, math.ceil(whole * fraction))
            if k >= whole:
                self.sizes.append(None)
                self.stand_ins.append(p)
            else:
                self.sizes.append(k)
                self.stand_ins.append(p.new_zeros(1).expand(k * block))
        self.index = [None] * len(params)
        self.scale = [None] * len(params)
        self.drawn = False

    def _blocks(self, g):
        whole = g.numel() // self.block
        return g.reshape(-1)[:whole * self.block].view(whole, self.block)

    def draw(self, grads):
        """Choose each sampled tensor's blocks from this gradient's block energies."""
        for i, (g, k) in enumerate(zip(grads, self.sizes)):
            if k is None:
                continue
            # (a non-finite first gradient is not recorded; its bad blocks just weigh nothing in the draw)
            energy = torch.nan_to_num(self._blocks(g).float().pow(2).sum(1), nan=0.0, posinf=0.0)
            pi = inclusion_probabilities(energy, k)
            gen = torch.Generator().manual_seed(mix_seed(self.seed, 4, i))  # host generator: same on every device
            self.index[i] = systematic_sample(pi, k, gen)
            self.scale[i] = pi.index_select(0, self.index[i]).rsqrt().float()
        self.drawn = True

    def sample(self, grads):
        """The sampled, scaled elements of each gradient (the gradient itself where it is probed whole).
        The first call draws the sample from `grads`."""
        if not self.drawn:
            self.draw(grads)
        out = []
        for g, idx, scale in zip(grads, self.index, self.scale):
            if idx is None:
                out.append(g)
            else:
                picked = self._blocks(g).index_select(0, idx)  # a new tensor: scaled in place
                out.append(picked.mul_(scale.to(picked.dtype)[:, None]).view(-1))
        return out

    # ---- state: the drawn sample (a resume no longer has the gradient it was drawn from) ----------
    def state_dict(self) -> dict:
        """{"index.i": int64 [k], "scale.i": float32 [k]} per sampled tensor, once drawn; {} before."""
        out = {}
        if self.drawn:
            for i, k in enumerate(self.sizes):
                if k is not None:
                    out[f"index.{i}"], out[f"scale.{i}"] = self.index[i], self.scale[i]
        return out

    def load_state_dict(self, state: dict, names=None):
        """Restore a drawn sample ({}: not drawn yet), onto the tensors' devices; a missing or unexpected
        key, a wrong shape or an index out of range raises ValueError naming the tensor."""
        if not state:
            self.index, self.scale, self.drawn = [None] * len(self.sizes), [None] * len(self.sizes), False
            return
        name = (lambda i: names[i]) if names else str
        expected = {f"{kind}.{i}" for i, k in enumerate(self.sizes) if k is not None for kind in ("index", "scale")}
        if set(state) != expected:
            missing = [f"{k.split('.')[0]}.{name(int(k.split('.')[1]))}" for k in sorted(expected - set(state))]
            raise ValueError(f"probe sample: keys do not match the sampled tensors; missing {missing[:3]}, "
                             f"unexpected {sorted(set(state) - expected)[:3]}")
        index, scale = [None] * len(self.sizes), [None] * len(self.sizes)
        for i, (k, p) in enumerate(zip(self.sizes, self.stand_ins)):
            if k is None:
                continue
            idx, sc = state[f"index.{i}"], state[f"scale.{i}"]
            if idx.shape != (k,) or sc.shape != (k,) or idx.dtype != torch.int64 or sc.dtype != torch.float32:
                raise ValueError(f"probe sample of {name(i)}: index {tuple(idx.shape)} {idx.dtype}, scale "
                                 f"{tuple(sc.shape)} {sc.dtype}; expected ({k},) int64 and ({k},) float32")
            # host syncs: once per tensor, when state is loaded
            if int(idx.min()) < 0 or int(idx.max()) >= self.whole[i] or not bool((sc >= 1).all()):
                raise ValueError(f"probe sample of {name(i)}: block indices must lie in [0, {self.whole[i]}) and "
                                 "scales 1/sqrt(pi) be >= 1")
            index[i], scale[i] = idx.to(p.device), sc.to(p.device)
        self.index, self.scale, self.drawn = index, scale, True
