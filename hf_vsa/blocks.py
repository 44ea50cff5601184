"""Skipping the backward of whole transformer blocks (DropBP, NeurIPS'24).

A skipped block runs its forward under no_grad, and its output is rebuilt as
    out.detach() + (h - h.detach())
whose value is `out` bit for bit and whose gradient with respect to the block's input h is the
identity: the residual path. Autograd then never enters the block: its tensors get no gradient,
no activation of it is kept for backward, and the blocks below still get theirs.
"""
import torch
from torch import nn


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
