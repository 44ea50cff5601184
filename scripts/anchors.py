"""Published methods hf_vsa is compared with, as benchmark configs (not part of the library).

DropBP (Woo et al., NeurIPS 2024), as its repository implements it (github.com/WooSunghyeon/dropbp:
dropbp/layer.py and dropbp/handler.py at d4c1cc1, dropbp/cpp_extention/allocate_p.cc at 44b1019,
huggingface/dropbp_trainer.py at d417961):
- a DropBP layer sits on the output of each residual branch of each transformer block (attention with
  its norm, MLP with its norm: `x = dropbp(h) + x`); in training it returns its input detached with
  probability p, drawn at every forward, so that branch runs no backward while the residual path
  carries the gradient on;
- every layer starts at the target rate (0.5); at 10% of training the rates are set from measured
  sensitivities (`gradnorm=True`, as their Lit-GPT and Hugging Face scripts call it): with a one-example
  batch, the per-parameter gradient norms with every branch kept, and with each branch dropped alone;
  a branch's sensitivity is the squared difference summed over parameters. The allocation is greedy
  under a FLOPs budget: starting from 0, the branch whose rate adds the least sensitivity goes up by 0.1
  (at most 0.9) until the kept FLOPs, sum (1 - p_i) f_i, are at most (1 - target) of the total;
- where every branch is dropped (no gradient anywhere), the backward is skipped.
FLOPs per branch (their ratio form): the branch's parameters (its matrix multiplies per token) plus,
for attention, 2 x sequence length x hidden size (scores and weighted sum). Their draws use Python's
global `random`; here a local generator seeded from the run's seed, so lockstep runs stay reproducible.
"""
import heapq
import random

import torch
from transformers import Trainer

ATTENTION = ("self_attn", "attn", "attention")
MLP = ("mlp",)


def branches(model):
    """[(kind, module)] of every transformer block's residual branches, in order (Llama, GPT-2, BERT)."""
    from hf_vsa.blocks import find_blocks
    out = []
    for block in find_blocks(model):
        children = dict(block.named_children())
        attn = next((children[n] for n in ATTENTION if n in children), None)
        if attn is not None and hasattr(attn, "self") and "intermediate" in children:  # BERT: attention.self
            out += [("attn", attn.self), ("mlp", children["intermediate"])]
            continue
        mlp = next((children[n] for n in MLP if n in children), None)
        if attn is None or mlp is None:
            raise ValueError(f"DropBP: no attention / MLP branch found in {type(block).__name__}")
        out += [("attn", attn), ("mlp", mlp)]
    return out


def allocate(sensitivity, flops, target, min_rate=0.0):
    """allocate_p.cc: greedy drop rates in steps of 0.1 (at most 0.9) until the kept FLOPs <= target.
    (Counted in tenths: their float32 rates stop at 0.9, float64 sums of 0.1 would pass it.)"""
    tenths = [0] * len(flops)
    heap = [(sensitivity[i] * (0.1 + min_rate), -i) for i in range(len(flops))]  # (cost of the next 0.1, -index)
    heapq.heapify(heap)
    kept = sum(flops) * (1 - min_rate)
    while kept > target and heap:
        cost, neg = heapq.heappop(heap)
        i = -neg
        tenths[i] += 1
        kept -= flops[i] * 0.1
        if min_rate + tenths[i] / 10 < 0.9 - 1e-9:
            heapq.heappush(heap, (cost + 0.1 * sensitivity[i], neg))
    return [min_rate + k / 10 for k in tenths]


class DropBPTrainer(Trainer):
    """The plain Trainer with DropBP as published (module docstring)."""

    def __init__(self, *args, drop_rate=0.5, sensitivity_at=0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.target, self.sensitivity_at = drop_rate, sensitivity_at
        self.branches = branches(self.model)
        self.rates = [drop_rate] * len(self.branches)
        self.dropped = [False] * len(self.branches)
        self.draw = random.Random(self.args.seed)
        self.forced = None  # while measuring (sensitivities, backward FLOPs): the branches dropped, no draw
        self.sensitivities = None
        for k, (_, module) in enumerate(self.branches):
            module.register_forward_hook(self._hook(k))
        backward = self.accelerator.backward

        def skip_when_nothing_needs_it(loss, **kw):  # every branch dropped: no backward at all
            if loss.requires_grad:
                backward(loss, **kw)
        self.accelerator.backward = skip_when_nothing_needs_it

    def _hook(self, k):
        def hook(module, inputs, output):
            if not module.training:
                return output
            if self.forced is not None:
                drop = k in self.forced
            else:
                drop = self.draw.random() < self.rates[k]
            self.dropped[k] = drop
            if not drop:
                return output
            if isinstance(output, tuple):
                return (output[0].detach(),) + tuple(output[1:])
            return output.detach()
        return hook

    def training_step(self, model, inputs, num_items_in_batch=None):
        at = int(self.state.max_steps * self.sensitivity_at)
        if self.sensitivities is None and self.state.global_step >= at:
            self._set_rates(model, inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def _grad_norms(self, model, one):
        model.zero_grad(set_to_none=True)
        loss = model(**one).loss
        if loss.requires_grad:
            loss.backward()
        return [p.grad.norm() if p.grad is not None else torch.zeros((), device=p.device)
                for p in model.parameters() if p.requires_grad]

    def _set_rates(self, model, inputs):
        """handler.sensitivity_based_drop_bp(gradnorm=True) on the step's first example."""
        one = {k: v[:1] for k, v in self._prepare_inputs(inputs).items() if isinstance(v, torch.Tensor)}
        seq = one["input_ids"].shape[1]
        self.forced = frozenset()
        try:
            base = self._grad_norms(model, one)
            sens = []
            for k in range(len(self.branches)):
                self.forced = frozenset([k])
                new = self._grad_norms(model, one)
                sens.append(float(sum(((o - n) ** 2) for o, n in zip(base, new))))
        finally:
            self.forced = None
            model.zero_grad(set_to_none=True)
        flops = []
        for kind, module in self.branches:
            n = sum(p.numel() for p in module.parameters())
            hidden = getattr(self.model.config, "hidden_size", None) or getattr(self.model.config, "n_embd", 0)
            flops.append(n + (2 * seq * hidden if kind == "attn" else 0))
        self.sensitivities = sens
        self.rates = allocate(sens, flops, (1 - self.target) * sum(flops))
