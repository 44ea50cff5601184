"""Work over all tensors as a few ops, whatever their number; host reads that never wait on the device.

- `Windows`: a fixed, seeded sample of every tensor made of a few contiguous windows (views, so
  gathering them from all gradients is one `torch.cat`: one kernel however many tensors there are),
  with the tensor (or group) each sampled element belongs to, for per-tensor sums as one
  `index_add_` (a segment reduction) instead of one reduction per tensor.
- `Gathered`: that sample of a step's gradients chunk by chunk, each chunk gathered when it is read.
- `Deferred`: device values the host reads one post late. `post` starts a non-blocking copy into
  host memory (pinned on CUDA) and records an event; `read` returns the values of the post before
  the latest, whose copy finished long ago, so the host never drains the device's queue for them.
  Every decision hf_vsa takes on WARMUP, FULL and PREDICT steps reads its inputs from here: the
  only host reads on those steps (hf_vsa's sync points are listed in docs/method.md).
- `host_list`: the values of a tensor made on the host (a CPU generator's draw): no device sync.
"""
import bisect
import math

import torch

from .compress import mix_seed

PIECES = 4  # contiguous windows per sampled tensor: rows from four places, not one run of rows


def host_list(t):
    """A CPU tensor's values (made on the host, or a finished Deferred copy): reading it is no sync."""
    assert t.device.type == "cpu", "host_list reads host tensors only; a device tensor's read is a sync"
    return t.numpy().tolist()


class Windows:
    """Per tensor, `pieces` contiguous windows at seeded offsets, `per_tensor` elements in all (the whole
    tensor where it has no more, or where `fraction` is 1), chosen once from (seed, tag, tensor): the same
    on every rank and resume, never saved. `gather(tensors)` is their elements concatenated, times `scale`
    (each sampled element stands for numel / sampled of its tensor: scaled by the square root of that,
    inner products of samples estimate the whole tensors', where a weight matrix outweighs a bias by its
    size). `groups`: per element, its group (default: its tensor), for `segment_sum`. `select`: the
    tensors sampled (default: all; the others have no element). `align`: each tensor's sample is padded
    with zeros to whole multiples of it, so a block of `align` elements belongs to one tensor
    (`block_owner`) and a tensor's blocks can be kept or dropped together."""

    def __init__(self, params, per_tensor, seed, tag, groups=None, scaled=True, fraction=0.0, select=None, align=1):
        self.params = list(params)
        chosen = set(range(len(self.params)) if select is None else select)
        self.slices = []  # per tensor: [(start, length)]
        self.lengths = []  # per tensor: sampled elements (0: not sampled)
        self.padded = []  # per tensor: sampled elements plus the zeros that align it
        for i, p in enumerate(self.params):
            n = p.numel()
            k = min(n, max(per_tensor, math.ceil(fraction * n))) if i in chosen else 0
            if k in (0, n):
                self.slices.append([(0, n)] if k else [])
            else:
                pieces = min(PIECES, k)
                size = -(-k // pieces)
                gen = torch.Generator().manual_seed(mix_seed(seed, tag, i))  # host generator: same everywhere
                starts = sorted(host_list(torch.randint(0, n - size + 1, (pieces,), generator=gen)))
                # windows may overlap where the tensor is small: each is a sample all the same
                self.slices.append([(s, size) for s in starts])
                k = size * pieces
            self.lengths.append(k)
            self.padded.append(-(-k // align) * align)
        self.align = align
        self.numel = sum(self.padded)
        self.offsets = [sum(self.padded[:i]) for i in range(len(self.padded))]
        dev = self.params[0].device
        owner = list(range(len(self.params))) if groups is None else groups
        self.n_groups = (max(owner) + 1) if owner else 0
        self.segment = torch.repeat_interleave(torch.tensor(owner, dtype=torch.long),
                                               torch.tensor(self.padded)).to(dev)
        self.block_owner = torch.repeat_interleave(torch.tensor(owner, dtype=torch.long),
                                                   torch.tensor(self.padded) // align).to(dev)
        self.covered = torch.tensor([k > 0 for k in self.lengths], dtype=torch.bool).to(dev)  # per tensor
        weights = [(p.numel() / k) ** 0.5 if scaled and k else 1.0 for p, k in zip(self.params, self.lengths)]
        self.scale = None
        if scaled:
            self.scale = torch.repeat_interleave(torch.tensor(weights, dtype=torch.float32),
                                                 torch.tensor(self.padded)).to(dev)
        self._zero = torch.zeros(max(self.padded, default=0), device=dev)  # stands in for None, and pads
        # The layout as pieces (flat offset, tensor or None for the aligning zeros, start in the tensor,
        # elements), in order: gather() of a range picks the pieces it overlaps (host arithmetic).
        self.pieces, at = [], 0
        for i, (slices, k, padded) in enumerate(zip(self.slices, self.lengths, self.padded)):
            for s, n in slices:
                self.pieces.append((at, i, s, n))
                at += n
            if padded > k:
                self.pieces.append((at, None, 0, padded - k))
                at += padded - k
        self._starts = [piece[0] for piece in self.pieces]

    def gather(self, tensors, start=0, length=None):
        """Flat fp32 sample of `tensors` (one per parameter; None reads as zeros), scaled: a cat of views.
        `start`, `length`: only those elements of it (a chunk), so that a caller working chunk by chunk
        holds one chunk's copy at a time, not the whole sample's."""
        end = self.numel if length is None else min(self.numel, start + length)
        parts = []
        for at, i, s, n in self.pieces[max(0, bisect.bisect_right(self._starts, start) - 1):]:
            if at >= end:
                break
            lo, hi = max(start, at), min(end, at + n)
            if hi > lo:
                t = None if i is None else tensors[i]
                parts.append(self._zero[:hi - lo] if t is None else t.reshape(-1)[s + lo - at:s + hi - at])
        out = torch.cat(parts) if parts else self._zero[:0].clone()
        if out.dtype != torch.float32:
            out = out.float()
        return out if self.scale is None else out.mul_(self.scale[start:end])

    def grads(self):
        return self.gather([p.grad for p in self.params])

    def views(self, flat):
        """{tensor: its elements of `flat` (a tensor shaped like gather's) as a view shaped like it}, for
        the tensors sampled whole (no op: views)."""
        return {i: flat[o:o + k].view_as(p) for i, (p, o, k) in enumerate(zip(self.params, self.offsets, self.lengths))
                if k and k == p.numel()}

    def blocks_of(self, index):
        """The `align`-blocks of the tensors in `index`, in order (host list)."""
        out = []
        for i in index:
            start = self.offsets[i] // self.align
            out.extend(range(start, start + self.padded[i] // self.align))
        return out

    def segment_sum(self, x, dtype=torch.float64, start=0):
        """Per group, the sum of x's elements (x: [..., numel], or the chunk of it from `start`) -> [..., groups]:
        one index_add_."""
        out = torch.zeros(*x.shape[:-1], self.n_groups, dtype=dtype, device=x.device)
        return out.index_add_(x.dim() - 1, self.segment[start:start + x.shape[-1]], x.to(dtype))


class Gathered:
    """The sample of a step's gradients as a sequence of chunks (`sizes`), chunk c gathered from the gradients
    when it is read (Windows.gather of its range, times inv_scale): a pass over the chunks holds one chunk's
    copy at a time, not the whole sample's. A sample of one chunk (the probe's) is gathered once and kept,
    since readers pass over it more than once."""

    def __init__(self, windows, sizes, grads, inv_scale=None):
        self.windows, self.sizes, self.grads, self.inv_scale = windows, sizes, grads, inv_scale
        self.starts = [sum(sizes[:c]) for c in range(len(sizes))]
        self.kept = self._gather(0) if len(sizes) == 1 else None

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, c):
        return self.kept if self.kept is not None else self._gather(c)

    def _gather(self, c):
        x = self.windows.gather(self.grads, self.starts[c], self.sizes[c])
        return x if self.inv_scale is None else x.mul_(self.inv_scale)

    def each(self):
        """(chunk, its start in the sample), one gathered at a time."""
        for c, start in enumerate(self.starts):
            yield self[c], start


class Deferred:
    """A 1-D float64 device vector posted now and read on the host one post later (see the module)."""

    def __init__(self):
        self.slots = []  # up to two: (host tensor, CUDA event or None, the posted device tensor), oldest first

    def post(self, values):
        values = values.detach().double().reshape(-1)
        cuda = values.device.type == "cuda"
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=cuda)
        host.copy_(values, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self.slots = (self.slots + [(host, event, values)])[-2:]

    def read(self):
        """The values of the post before the latest (host floats), or None before two posts."""
        if len(self.slots) < 2:
            return None
        host, event, _ = self.slots[0]
        if event is not None:
            event.synchronize()  # recorded a post ago: long done, so this waits for nothing
        return host_list(host)

    def state_dict(self) -> dict:
        return {f"slot{k}": values for k, (_, _, values) in enumerate(self.slots)}

    def load_state_dict(self, state: dict, device):
        self.slots = []
        for k in range(len(state)):
            self.post(state[f"slot{k}"].to(device))
