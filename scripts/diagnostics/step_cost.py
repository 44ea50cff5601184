"""Where the plain Trainer's step time goes on a benchmark task, and the most that any step which
keeps the forward pass can save per optimizer step.

usage:
    python scripts/diagnostics/step_cost.py                                   # the three benchmark tasks
    python scripts/diagnostics/step_cost.py --tasks sentiment --steps 40 --out bench_out/step_cost.json
    python scripts/diagnostics/step_cost.py --quick --tasks gpt2_scratch      # a few steps, for CI smoke tests

Runs the benchmark's own Trainer (scripts/benchmark.py: same model, data, batch and settings) and
times every optimizer step in three parts: the forward (`compute_loss` with autograd on), the
backward (`accelerator.backward`) and the rest (clipping, optimizer, scheduler, data loading,
callbacks). Then it times the forward alone under `torch.no_grad()` (no activations saved) on the
run's training batches. A step that skips the whole backward but keeps the forward costs at least
the cheaper forward + rest, so if a share p of the steps still runs backprop, no such method is
faster per step than

    ceiling(p) = 1 / (p + (1 - p) * (forward + rest) / step)

That holds even with prediction costing nothing and a PREDICT step doing no backward at all.
The script prints the ceiling for several p, and the largest p that would still leave room for 2x.
It syncs with CUDA around each part: this is a diagnostic, not the benchmark. Never run it while
anything else heavy runs on the machine.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/: benchmark, tasks

import torch

from benchmark import TASKS, StepClock, make_trainer
from benchmark import parse as bench_parse


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # host sync: deliberate, the parts are timed from the host


class Parts(StepClock):
    """benchmark.py's step clock (from one step's end to the next: data loading and logging
    included), plus the seconds each step spent in the forward and in the backward."""

    def __init__(self):
        super().__init__()
        self.forward, self.backward = [], []
        self._f = self._b = 0.0

    def timed(self, fn, part):
        def run(*args, **kw):
            if part == "forward" and not torch.is_grad_enabled():
                return fn(*args, **kw)  # an evaluation's forward: not part of a training step
            _sync()
            t = time.perf_counter()
            out = fn(*args, **kw)
            _sync()
            dt = time.perf_counter() - t
            if part == "forward":
                self._f += dt
            else:
                self._b += dt
            return out
        return run

    def on_step_end(self, args, state, control, **kw):
        _sync()
        super().on_step_end(args, state, control, **kw)
        self.forward.append(self._f)
        self.backward.append(self._b)
        self._f = self._b = 0.0


def ceiling(p, floor_share):
    """Per-step speedup bound when a share p of steps runs backprop and the rest cost
    floor_share of a step (forward + rest)."""
    return 1.0 / (p + (1.0 - p) * floor_share)


def max_backprop_share_for(target, floor_share):
    """The largest backprop share p with ceiling(p) >= target; None where even p=0 falls short."""
    if floor_share >= 1.0 / target:
        return None
    return (1.0 / target - floor_share) / (1.0 - floor_share)


def no_grad_forward(trainer, n):
    """Seconds of n training-mode forwards under no_grad, on the run's own training batches."""
    model = trainer.model
    model.train()
    times = []
    loader = trainer.get_train_dataloader()
    batches = iter(loader)
    with torch.no_grad():
        for _ in range(n):
            batch = next(batches, None)
            if batch is None:  # a training set shorter than n batches: go round again
                batches = iter(loader)
                batch = next(batches)
            inputs = trainer._prepare_inputs(batch)
            _sync()
            t = time.perf_counter()
            trainer.compute_loss(model, inputs)
            _sync()
            times.append(time.perf_counter() - t)
    return times


def measure(task, a):
    b = bench_parse(["--task", task, "--workdir", a.workdir] + (["--quick"] if a.quick else [])
                    + (["--cpu"] if a.cpu else []))
    b.seed = a.seed
    b.steps = a.skip + a.steps
    b.eval_every = b.steps + 1  # no evaluation inside the timed steps
    parts = Parts()
    trainer = make_trainer("step_cost", None, b, [parts])
    trainer.compute_loss = parts.timed(trainer.compute_loss, "forward")
    trainer.accelerator.backward = parts.timed(trainer.accelerator.backward, "backward")
    trainer.train()
    keep = slice(a.skip, None)  # the first steps warm up allocators and kernels
    fwd, bwd, step = (statistics.median(x[keep]) for x in (parts.forward, parts.backward, parts.steps))
    rest = max(step - fwd - bwd, 0.0)
    # A step with no backward at all can run its forward without autograd, which saves nothing
    # for backward and can be cheaper: time that forward too (train mode, so dropout still runs)
    # and bound with the cheaper of the two.
    free = no_grad_forward(trainer, a.skip + a.steps)[a.skip:]
    fwd_free = statistics.median(free)
    floor_share = (min(fwd, fwd_free) + rest) / step
    return {"task": task, "steps_timed": len(parts.steps[keep]), "batch": b.batch,
            "median_seconds": {"forward": fwd, "backward": bwd, "rest": rest, "step": step,
                               "forward_no_grad": fwd_free},
            "share": {"forward": fwd / step, "backward": bwd / step, "rest": rest / step,
                      "forward_no_grad": fwd_free / step},
            "backward_over_forward": bwd / fwd,
            "floor_share": floor_share,
            "ceiling": {str(p): ceiling(p, floor_share) for p in a.backprop_shares},
            "max_backprop_share_for_2x": max_backprop_share_for(2.0, floor_share)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="sentiment,gpt2_scratch,smollm",
                   help=f"comma-separated, from {sorted(TASKS)}")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per task")
    p.add_argument("--skip", type=int, default=3, help="untimed steps first (warm-up)")
    p.add_argument("--backprop_shares", default="0,0.25,0.4", help="comma-separated p for the ceiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="force CPU even where CUDA is available")
    p.add_argument("--quick", action="store_true", help="smoke test: 4 timed steps, the benchmark's --quick sizes")
    p.add_argument("--out", default="bench_out/step_cost.json")
    p.add_argument("--workdir", default="bench_out/runs")
    a = p.parse_args(argv)
    tasks = a.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known: {sorted(TASKS)}")
    if a.steps < 1 or a.skip < 0:
        raise SystemExit("--steps must be at least 1 and --skip at least 0")
    a.backprop_shares = [float(x) for x in a.backprop_shares.split(",")]
    if any(not 0.0 <= x <= 1.0 for x in a.backprop_shares):
        raise SystemExit("--backprop_shares: each value must lie in [0, 1]")
    if a.quick:
        a.steps, a.skip = 4, 1
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.cpu else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    rows = [measure(t, a) for t in tasks]
    result = {"device": device, "torch": torch.__version__, "args": vars(a), "tasks": rows}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    shares = a.backprop_shares
    print(f"\ndevice: {device}; torch {torch.__version__}; median of {a.steps} steps after {a.skip}")
    print("| task | step (s) | forward | backward | rest | forward, no_grad | backward / forward | "
          + " | ".join(f"ceiling, p={x:g}" for x in shares) + " | largest p for 2x |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(shares) + "---|")
    for r in rows:
        s, m = r["share"], r["median_seconds"]
        p2 = r["max_backprop_share_for_2x"]
        print(f"| {r['task']} | {m['step']:.3f} | {s['forward']:.0%} | {s['backward']:.0%} | {s['rest']:.0%} | "
              f"{s['forward_no_grad']:.0%} | {r['backward_over_forward']:.2f} | " + " | ".join(f"{r['ceiling'][str(x)]:.2f}x" for x in shares)
              + f" | {'none' if p2 is None else f'{p2:.2f}'} |")
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
