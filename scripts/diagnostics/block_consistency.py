"""Check hf_vsa's sampled estimate of each block's lag-1 gradient cosine against the whole blocks'.

Trains a benchmark task with plain AdamW (clip 1.0, the task's batch and learning rate, no VSA) and,
at each step after --skip, compares the cosine between this step's and the last step's gradient of
each transformer block, over its whole tensors and as hf_vsa's Consistency estimates it (a seeded
random sample of 1024 elements per tensor, scaled by size), on the same gradients.

usage:
    python scripts/diagnostics/block_consistency.py --task gpt2_scratch --steps 60
"""
import argparse
import statistics

import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/: benchmark, tasks

import torch
from benchmark import TASKS, training_batches
from hf_vsa.blocks import Consistency, find_blocks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="gpt2_scratch", choices=list(TASKS))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="steps before the first comparison")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.batch = a.lr = a.max_length = a.eval_every = a.n_eval = None  # the task's defaults
    model, batch, n = training_batches(a)
    params = [q for q in model.parameters() if q.requires_grad]
    groups = [[q for q in b.parameters() if q.requires_grad] for b in find_blocks(model)]
    est = Consistency(groups, "cpu", seed=a.seed)
    opt = torch.optim.AdamW(params, lr=a.lr)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed)).tolist()
    prev, whole, sampled = None, [], []
    for t in range(a.steps):
        opt.zero_grad()
        model(**batch(order[t * a.batch:(t + 1) * a.batch])).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        g = [[q.grad.double().clone() for q in grp] for grp in groups]
        before = est.mean.clone()
        est.update(t)
        if prev is not None and t >= a.skip:
            row = []
            for x, y in zip(g, prev):
                dot = sum((u * v).sum() for u, v in zip(x, y))
                row.append((dot / (sum(u.pow(2).sum() for u in x) * sum(v.pow(2).sum() for v in y)).sqrt()).item())
            whole.append(row)  # host sync: a diagnostic script
            k = min(est.measured, 8)  # this step's measurement, out of the running mean
            sampled.append((k * est.mean - (k - 1) * before).tolist())  # host sync: a diagnostic script
        prev = g
        opt.step()
    print(f"{a.task}, steps {a.skip}-{a.steps - 1}: per block, mean lag-1 gradient cosine, whole tensors / sampled")
    for k in range(len(groups)):
        print(f"block {k}: {statistics.mean(r[k] for r in whole):+.3f} / {statistics.mean(r[k] for r in sampled):+.3f}")


if __name__ == "__main__":
    main()
