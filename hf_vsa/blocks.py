"""Skipping the backward of whole transformer blocks (DropBP, NeurIPS'24).

A skipped block runs its forward under no_grad, and its output is rebuilt as
    out.detach() + (h - h.detach())
whose value is `out` bit for bit and whose gradient with respect to the block's input h is the
identity: the residual path. Autograd then never enters the block: its tensors get no gradient,
no activation of it is kept for backward, and the blocks below still get theirs.

How often a block is skipped follows what its gradient is: Consistency measures, per block, the
cosine between its gradients at consecutive backprop steps (or noise.py the mean's share, where a
step has several micro-batches), and policy.drop_probabilities skips only the blocks whose gradient carries
less signal per unit of backward cost than the step's, more often the noisier they are.
"""
import torch
from torch import nn

from .compress import mix_seed
from .flat import Windows, host_list
from .policy import drop_probabilities


def find_blocks(model) -> list:
    """The model's transformer blocks: the longest nn.ModuleList whose children are all of one class
    (BERT's encoder.layer, GPT-2's h, Llama's layers); [] when there is none."""
    best = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1 and len(m) > len(best):
            best = list(m)
    return best


class BlockSkip:
    """Forward hooks on `blocks` that make the ones in `self.skipped` (a set of indices) skip their
    backward. Inactive (no effect at all) while the set is empty or grad mode is off."""

    def __init__(self, blocks):
        self.skipped = set()
        self._inputs = {}  # block index -> (its input, the grad mode to restore)
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(b.register_forward_hook(self._post(i), with_kwargs=True))

    def _pre(self, i):
        def hook(module, args, kwargs):
            if i not in self.skipped or not torch.is_grad_enabled():
                return
            h = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"hf_vsa: cannot skip the backward of {type(module).__name__}: its first "
                                "argument is not the hidden states tensor")
            self._inputs[i] = h
            torch.set_grad_enabled(False)
        return hook

    def _post(self, i):
        def hook(module, args, kwargs, out):
            if i not in self._inputs:
                return None
            h = self._inputs.pop(i)
            torch.set_grad_enabled(True)
            first = out[0] if isinstance(out, tuple) else out
            if first.shape != h.shape:
                raise TypeError(f"hf_vsa: cannot skip the backward of {type(module).__name__}: its output "
                                f"{tuple(first.shape)} is not shaped like its input {tuple(h.shape)}")
            first = first + (h - h.detach())  # value unchanged; gradient to h: the identity
            return (first, *out[1:]) if isinstance(out, tuple) else first
        return hook

    def reset(self):
        """Skip nothing; after a forward that raised, restore grad mode."""
        if self._inputs:
            torch.set_grad_enabled(True)
        self._inputs.clear()
        self.skipped = set()

    def remove(self):
        """Take the hooks off the blocks, for good."""
        self.reset()
        for h in self.handles:
            h.remove()
        self.handles = []


# Elements of each tensor the consistency measure reads: a cosine over a block's ~10 sampled tensors
# (~10^4 elements) of two unrelated gradients has a standard deviation of ~0.01.
SAMPLE = 1024


class Consistency:
    """Per block, how alike its gradients are from one backprop step to the next: the running mean
    (over the last few measurements) of the cosine between consecutive backprop steps' gradients
    (of the whole block), estimated on a fixed sample of each tensor (flat.Windows: at most SAMPLE
    elements in a few contiguous windows at seeded offsets, the same on every rank and resume, so
    never saved), scaled by its size. A window holds whole rows of a weight matrix, so it covers
    every column (a strided sample can fall on a handful of columns, whose gradients are not typical).
    Gathered as one cat of views and summed per block as one segment sum: the ops do not grow with
    the number of tensors or blocks.
    Measured only where two backprop steps follow each other (WARMUP, FULL blocks): a PREDICT step
    in between has no full gradient. Tensors only, on the parameters' device; no host sync."""

    def __init__(self, groups, device, seed=0):
        self.groups = groups  # per block, its trainable tensors
        tensors = [p for g in groups for p in g]
        owner = [k for k, g in enumerate(groups) for _ in g]
        self.windows = Windows(tensors, SAMPLE, seed, 5, groups=owner) if tensors else None
        n = self.windows.numel if tensors else 0
        self.prev = torch.zeros(n, device=device)  # the last backprop step's sample
        self.mean = torch.zeros(len(groups), dtype=torch.float64, device=device)
        self.prev_step = -2  # the optimizer step self.prev was read at
        self.measured = 0  # measurements so far

    def update(self, step: int):
        """After the backward of optimizer step `step` (gradients synchronised and accumulated)."""
        if self.windows is None:
            return
        x = self.windows.grads()
        if step == self.prev_step + 1:
            sums = self.windows.segment_sum(torch.stack([x * self.prev, x * x, self.prev * self.prev]))
            dots, norms, prev = sums
            cos = dots / (norms * prev).sqrt().clamp_min(1e-30)
            # An overflowed (fp16) or empty gradient measures nothing: keep the mean.
            cos = torch.where(cos.isfinite() & (norms * prev > 0), cos, self.mean)
            self.measured += 1
            self.mean += (cos - self.mean) / min(self.measured, 8)
        self.prev.copy_(x)
        self.prev_step = step

    def state_dict(self) -> dict:
        return {"prev": self.prev, "mean": self.mean, "prev_step": self.prev_step, "measured": self.measured}

    def load_state_dict(self, state: dict) -> bool:
        """Restore saved measurements; False where there is nothing to restore into or from (the
        state or this run has no droppable block: vsa_block_drop=1 on one side), which starts the
        measurement afresh. Any other mismatch is refused."""
        if not self.groups or not state["mean"].numel():
            return False
        for key in ("prev", "mean"):
            mine, theirs = getattr(self, key), state[key]
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise ValueError(f"{key} is {tuple(theirs.shape)} {theirs.dtype}, the model's {len(self.groups)} "
                                 f"measured groups (droppable blocks, and the tensors computed every step) need "
                                 f"{tuple(mine.shape)} {mine.dtype}")
            setattr(self, key, theirs.to(mine.device))
        for key in ("prev_step", "measured"):
            if not isinstance(state[key], int):
                raise ValueError(f"{key} must be an int, got {state[key]!r}")
            setattr(self, key, state[key])
        return True


class BlockDrop:
    """DropBP for one model on partial PREDICT steps: the droppable blocks (those whose trainable
    tensors are all predicted, below the `exact` ones), their measured consistency, the drop
    probabilities (a host list, refreshed once per PREDICT block) and each step's draw.

    `params`: the engine's trainable tensors, in order; `exact`: the indices of those every partial
    step computes. vsa_block_drop = 1 (every predicted tensor frozen) has no droppable block."""

    def __init__(self, model, params, exact, base, adaptive, seed):
        self.base, self.adaptive, self.seed = base, adaptive, seed
        index = {id(p): i for i, p in enumerate(params)}
        n_predicted = min(exact) if exact else len(params)
        self.blocks, owned = [], []  # droppable blocks; per block, the indices of its tensors
        if exact and base < 1.0:
            for b in find_blocks(model):
                mine = [q for q in b.parameters() if q.requires_grad]
                if mine and all(index.get(id(q), n_predicted) < n_predicted for q in mine):
                    self.blocks.append(b)
                    owned.append([index[id(q)] for q in mine])
        self.block_tensors = owned
        self.skip = BlockSkip(self.blocks) if self.blocks else None
        # Each block's lag-1 gradient cosine, and that of the exact tensors, measured at consecutive
        # backprop steps (always, so a checkpoint holds it whatever vsa_adaptive_block_drop says).
        self.groups = owned + [sorted(exact)] if owned else []
        self.group_sizes = [sum(params[i].numel() for i in g) for g in self.groups]
        owner = [len(self.groups)] * len(params)  # per tensor its group; len(groups): none
        for k, g in enumerate(self.groups):
            for i in g:
                owner[i] = k
        self.owner = torch.tensor(owner, dtype=torch.long).to(params[0].device)
        self.consistency = Consistency([[params[i] for i in g] for g in self.groups], params[0].device, seed)
        self.drop = [base] * len(self.blocks)

    def remove(self):
        if self.skip is not None:
            self.skip.remove()

    def shares(self, noise):
        """Each group's mean share of its gradient (a device tensor), from the micro-batch gradients'
        noise scale (`noise`) where a step has two or more (it tells noise from a deterministic
        oscillation, which also makes the lag-1 cosine low), else from the lag-1 cosine; None where
        the rates are not measured (no block, or vsa_adaptive_block_drop off). Rank-local: the engine
        averages it over processes before rates(), so that every rank skips the same blocks."""
        if not (self.blocks and self.adaptive):
            return None
        share = noise.group_share(self.owner, len(self.groups))
        return self.consistency.mean if share is None else share

    def rates(self, share):
        """The drop probabilities from the groups' (averaged) shares, on the device."""
        return drop_probabilities(share, self.base, self.group_sizes)

    def refresh(self, rates):
        """The drop probabilities for the PREDICT block that starts: the measured `rates` (host floats,
        posted a backprop step earlier) where vsa_adaptive_block_drop is on and they were measured
        (None: not), else vsa_block_drop."""
        self.drop = [self.base] * len(self.blocks)
        if self.blocks and self.adaptive and rates is not None:
            self.drop = [float(r) for r in rates]

    @property
    def skips_none(self) -> bool:
        """The measured probabilities skip no block: a partial step would save no backward."""
        return bool(self.blocks) and self.adaptive and max(self.drop) == 0

    def draw(self, step) -> set:
        """The tensors of the blocks skipped at optimizer step `step` (block k with probability drop[k],
        drawn from (seed, step): the same on every rank, micro-batch and resume); arms the skip hooks."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 3, step))
        u = host_list(torch.rand(len(self.blocks), generator=gen))  # host generator: no device sync
        self.skip.skipped = {k for k in range(len(self.blocks)) if u[k] < self.drop[k]}
        return {i for k in self.skip.skipped for i in self.block_tensors[k]}
