"""Memory and fidelity of each vsa_compression kind, against 'none', measured in one run.

usage:
    python scripts/diagnostics/bench_memory.py                 # MiniLM-L6 + a 106M GPT-2, then 150-step MiniLM runs
    python scripts/diagnostics/bench_memory.py --skip_training # the gradient measurements only (part 1)
    python scripts/diagnostics/bench_memory.py --training_only # the training runs only (part 2)
    python scripts/diagnostics/bench_memory.py --quick         # tiny models, a few steps (CI smoke test)

Part 1, per model (the MiniLM-L6 encoder of the sentiment task, and a causal LM of >= 100M
parameters built from a GPT2Config and trained on CPython sources): real gradients of
window + 1 consecutive AdamW steps are recorded; for each kind the predictor stores the first
`window` of them and the script prints
  - state bytes / trainable fp32 bytes (predictor + compressor, residual included),
  - compress (record) and decompress (read back the fit) throughput, fp32 gradient GB per second,
  - cosine of one record's ternary round trip with the gradient (a vsa record is read from a full
    bundle, crosstalk included),
  - cosine of the fit read back from the compressed records with the same fit over fp32 records,
  - cosine of the prediction with the actual next gradient.
Part 2: VSATrainer (defaults) on each benchmark task of --tasks (default: sentiment) for the
benchmark budget with each kind, over seeds: peak VSA state, mean predicted-vs-actual cosine at
CORRECT steps, final eval loss and step time, each against the 'none' run of the same seed.
"""
import argparse
import json
import os
import sys
import time

import torch
from transformers import set_seed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/: benchmark, tasks
import benchmark  # noqa: E402
from hf_vsa import GradientPredictor  # noqa: E402
from hf_vsa.compress import CompressedHistory  # noqa: E402
from tasks import gpt2_scratch_task, sentiment_task, tiny_dataset, tiny_model  # noqa: E402

KINDS = ("none", "ternary", "vsa")


def cosine(a, b):
    a = torch.cat([x.reshape(-1).double() for x in a])  # fp32 sums over 100M elements drift
    b = torch.cat([x.reshape(-1).double() for x in b])
    return torch.nn.functional.cosine_similarity(a, b, 0).item()  # host sync: measurement


def record_gradients(model, batches, lr):
    """Gradients (fp32 clones) of consecutive AdamW steps, one batch each."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    out = []
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        out.append([p.grad.detach().float().clone() for p in params])
        opt.step()
    return params, out


def collate(ds, rows, keys):
    return {k: torch.tensor(ds[rows][k]) for k in keys}


def models(a):
    """(name, model, batches, lr): real gradient sources."""
    n = a.window + 1
    if a.quick:
        ds = tiny_dataset(8 * n)
        yield "tiny BERT", tiny_model(), [collate(ds, slice(8 * i, 8 * i + 8), ("input_ids", "attention_mask", "labels"))
                                           for i in range(n)], 1e-3
        return
    model, _, train, _ = sentiment_task(seed=0)
    keys = ("input_ids", "attention_mask", "labels")
    yield "MiniLM-L6 encoder", model, [collate(train, slice(32 * i, 32 * i + 32), keys) for i in range(n)], 1e-4
    model, train, _ = gpt2_scratch_task(layers=15, width=768, n_eval=8)
    yield "GPT-2 (15 x 768, from config)", model, [collate(train, slice(4 * i, 4 * i + 4), ("input_ids", "labels"))
                                                    for i in range(n)], 3e-4


def measure(params, grads, a):
    window = a.window
    trainable = 4 * sum(p.numel() for p in params)
    rows, ref = [], None
    for kind in KINDS:
        pred = GradientPredictor(params, compression=kind, window=window, block=a.block, seed=0)
        pred.allocate()  # (otherwise at the first record: keep allocation out of the timing)
        t0 = time.perf_counter()
        for t, g in enumerate(grads[:window - 1]):
            pred.record(g, t)
        compress_s = time.perf_counter() - t0
        pred.correct(grads[window - 1], window - 1)  # fills the residual too
        t0 = time.perf_counter()
        fit = pred.predict_base(window)
        decompress_s = time.perf_counter() - t0
        state = sum(v.numel() * v.element_size() for v in pred.state_dict().values() if isinstance(v, torch.Tensor))
        ref = fit if kind == "none" else ref
        row = {"kind": kind, "state_ratio": state / trainable,
               "compress_gbs": trainable * (window - 1) / compress_s / 1e9,
               "decompress_gbs": trainable / decompress_s / 1e9,
               "fit_cosine_vs_none": cosine(fit, ref),
               "predicted_vs_actual_cosine": cosine(pred.predict(window), grads[window])}
        if kind == "none":
            row["record_roundtrip_cosine"] = 1.0
        else:  # one record read back from a full ring (for vsa: with its bundle's crosstalk)
            h = CompressedHistory(params, kind, window=window, block=a.block, seed=0)
            for t, g in enumerate(grads[:window]):
                h.push(g, t)
            row["record_roundtrip_cosine"] = cosine(h.weighted_sum({0: 1.0}), grads[0])
        rows.append(row)
        del pred, fit
    return rows


def print_rows(name, n, rows):
    print(f"\n{name}: {n / 1e6:.1f}M trainable parameters")
    print(f"{'kind':<9}{'state/fp32':>11}{'compress GB/s':>15}{'decompress GB/s':>17}{'record cos':>12}"
          f"{'fit cos vs none':>17}{'pred-vs-actual cos':>20}")
    for r in rows:
        print(f"{r['kind']:<9}{r['state_ratio']:>10.3f}x{r['compress_gbs']:>15.2f}{r['decompress_gbs']:>17.2f}"
              f"{r['record_roundtrip_cosine']:>12.3f}{r['fit_cosine_vs_none']:>17.3f}{r['predicted_vs_actual_cosine']:>20.3f}")


def training(a):
    """Part 2: one VSATrainer run per kind and seed on each task; means over seeds."""
    return {task: training_task(task, a) for task in a.tasks}


def training_task(task, a):
    per_kind = {k: [] for k in KINDS}
    for seed in a.seeds:
        argv = ["--task", task, "--seeds", str(seed)] + (["--quick"] if a.quick else [])
        b = benchmark.parse(argv + (["--steps", str(a.steps)] if a.steps else []))
        b.seed, b.workdir = seed, os.path.join(os.path.dirname(a.out) or ".", "mem_runs")
        for k in KINDS:
            print(f"== {task} seed {seed}: vsa_compression={k}", flush=True)
            r = benchmark.run_one(k, {"vsa_compression": k}, b)
            per_kind[k].append({"seed": seed, "steps": len(r["step_wall"]), "state_ratio": r["state_memory_peak_ratio"],
                                "state_ratio_end": r["state_memory_ratio"],
                                "correct_cosine": r["prediction_cosine_mean"], "final_eval_loss": r["final_eval_loss"],
                                # single evaluations swing by several % from one to the next: also the
                                # mean of the last five, a steadier view of where the run ended
                                "last5_eval_loss": sum(e["eval_loss"] for e in r["evals"][-5:]) / len(r["evals"][-5:]),
                                "evals": r["evals"],
                                "step_wall_mean": sum(r["step_wall"]) / len(r["step_wall"])})
    mean = lambda xs: sum(xs) / len(xs)
    base = per_kind["none"]
    print(f"\n{task}, {base[0]['steps']} steps, seeds {a.seeds}: VSATrainer defaults with each compression "
          "(mean over seeds; 'vs none' pairs each seed with the 'none' run of that seed)")
    print(f"{'kind':<9}{'peak state':>11}{'CORRECT cos':>13}{'vs none':>9}{'final eval':>12}{'vs none':>16}"
          f"{'last-5 evals vs none':>22}{'step time vs none':>19}")
    out = []
    for k, runs in per_kind.items():
        d_cos = [r["correct_cosine"] - b0["correct_cosine"] for r, b0 in zip(runs, base)]
        d_eval = [r["final_eval_loss"] / b0["final_eval_loss"] - 1 for r, b0 in zip(runs, base)]
        d_last5 = [r["last5_eval_loss"] / b0["last5_eval_loss"] - 1 for r, b0 in zip(runs, base)]
        d_time = [r["step_wall_mean"] / b0["step_wall_mean"] for r, b0 in zip(runs, base)]
        row = {"kind": k, "state_ratio": runs[0]["state_ratio"], "correct_cosine": mean([r["correct_cosine"] for r in runs]),
               "cosine_minus_none": mean(d_cos), "final_eval_loss": mean([r["final_eval_loss"] for r in runs]),
               "eval_vs_none": mean(d_eval), "eval_vs_none_min": min(d_eval), "eval_vs_none_max": max(d_eval),
               "last5_eval_vs_none": mean(d_last5), "step_time_vs_none": mean(d_time), "runs": runs}
        out.append(row)
        spread = f"[{row['eval_vs_none_min']:+.1%},{row['eval_vs_none_max']:+.1%}]"
        print(f"{k:<9}{row['state_ratio']:>10.3f}x{row['correct_cosine']:>13.3f}{row['cosine_minus_none']:>+9.3f}"
              f"{row['final_eval_loss']:>12.4f}{row['eval_vs_none']:>+7.1%} {spread:>8}{row['last5_eval_vs_none']:>+22.1%}"
              f"{row['step_time_vs_none']:>18.2f}x")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, help="part 2 optimizer steps (the benchmark's default budget)")
    p.add_argument("--seed", type=int, default=0, help="part 1 seed")
    p.add_argument("--seeds", default="0,1,2", help="part 2: comma-separated seeds")
    p.add_argument("--tasks", default="sentiment", help="part 2: comma-separated benchmark tasks "
                   f"({', '.join(benchmark.TASKS)})")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip_training", action="store_true", help="part 1 only")
    p.add_argument("--training_only", action="store_true", help="part 2 only")
    p.add_argument("--out", default="bench_out/memory.json")
    a = p.parse_args(argv)
    if a.skip_training and a.training_only:
        p.error("--skip_training and --training_only exclude each other (together they would run nothing)")
    a.seeds = [int(x) for x in a.seeds.split(",")]
    a.tasks = a.tasks.split(",")
    unknown = [t for t in a.tasks if t not in benchmark.TASKS]
    if unknown:
        p.error(f"--tasks: unknown {unknown}; allowed: {', '.join(benchmark.TASKS)}")
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"args": vars(a), "torch": torch.__version__, "models": []}
    for name, model, batches, lr in ([] if a.training_only else models(a)):
        set_seed(a.seed)
        params, grads = record_gradients(model, batches, lr)
        rows = measure(params, grads, a)
        n = sum(p.numel() for p in params)
        print_rows(name, n, rows)
        result["models"].append({"model": name, "trainable": n, "rows": rows})
        del model, params, grads
    if not a.skip_training:
        result["training"] = training(a)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
