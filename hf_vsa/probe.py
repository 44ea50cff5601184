"""Measure a prediction on a sample of each tensor before paying for it in full.

The gate (vsa_min_cosine) admits a tensor's prediction only once CORRECT steps have measured its
cosine with the actual gradient, and retires the tensors it keeps out. Measured on our tasks, it
keeps out most of them: paying for a full compressed history of every tensor until then is most
of what the first cycle costs on a large model. A cosine needs far fewer elements than the
tensor has to be measured: so the predictor first runs on a fixed random sample of whole blocks
of each tensor (`vsa_probe_fraction` of them, at least MIN_BLOCKS), and only the tensors still
tracked when the first cycle's measurements are in get a full history (see VSAEngine.end_probe).

The sample is regenerated from (seed, tensor index) with a local generator, never stored.
"""
import math

import torch

from .compress import mix_seed

# A tensor of at most this many blocks is probed whole. 16 blocks of 256 elements: the cosine of two
# unrelated 4096-element vectors has a standard deviation of 1/64 (0.016), well below the gate's 0.2.
MIN_BLOCKS = 16


class Probe:
    """Per tensor, the sorted indices of the whole blocks it samples (None: the whole tensor), and a
    stand-in tensor shaped like the sample (one element allocated) for the predictor to track."""

    def __init__(self, params, fraction, block, seed):
        self.block, self.index, self.stand_ins = block, [], []
        for i, p in enumerate(params):
            whole = p.numel() // block
            k = max(MIN_BLOCKS, math.ceil(whole * fraction))
            if k >= whole:
                self.index.append(None)
                self.stand_ins.append(p)
                continue
            gen = torch.Generator().manual_seed(mix_seed(seed, 4, i))  # host generator: same on every device
            self.index.append(torch.randperm(whole, generator=gen)[:k].sort().values.to(p.device))
            self.stand_ins.append(p.new_zeros(1).expand(k * block))

    def sample(self, grads):
        """The sampled elements of each gradient (the gradient itself where it is probed whole)."""
        out = []
        for g, idx in zip(grads, self.index):
            if idx is None:
                out.append(g)
            else:
                whole = g.numel() // self.block
                out.append(g.reshape(-1)[:whole * self.block].view(whole, self.block).index_select(0, idx).view(-1))
        return out
