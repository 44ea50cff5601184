"""Plain Trainer vs VSATrainer on the same model, data order and seed, measured in one run.

usage:
    python scripts/benchmark.py                          # sentiment task, trainer vs default vs sketch
    python scripts/benchmark.py --configs trainer,default --steps 150 --eval_every 10 --out bench.json
    python scripts/benchmark.py --quick                  # a few steps, for CI smoke tests

Writes a JSON with, per run: per-step wall time and phase, measured train loss, eval loss every
--eval_every steps with the cumulative training wall time (evaluation time excluded). Prints two
ratios against the plain Trainer from this same run: wall time per optimizer step
(Trainer / run) and wall time to reach the Trainer's final eval loss (run / Trainer).
Never benchmark while anything else heavy runs on the machine.
"""
import argparse
import json
import os
import platform
import random
import sys
import threading
import time

# torch.compile (the compile configs) compiles in this process, in the run's own steps: with a pool of compile
# workers its kernels build in the background, during the other runs' turns in lockstep, and are charged to them
# (measured: the plain Trainer's first step took 80 s beside two compiled runs).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np

import torch
from accelerate.state import GradientState
from transformers import Trainer, TrainerCallback, set_seed

from hf_vsa import VSATrainer, VSATrainingArguments
from hf_vsa.config import PRESETS
from backward_flops import BackwardLog
from tasks import gpt2_scratch_task, llama_scratch_task, sentiment_task, smollm_task

# The seed's schedule, whole-step PREDICT on every PREDICT step, nothing gated or adapted (the "whole_steps" preset).
FORCED = dict(PRESETS["whole_steps"])
# Named VSA configurations (vsa_* overrides on top of VSATrainingArguments' defaults).
CONFIGS = {
    "trainer": None,  # the plain transformers.Trainer
    "default": {},
    "sketch": {"vsa_preset": "sketch"},
    # The plain Trainer at the task's own batch (no accumulation) over the same examples: the smaller
    # batch a user could pick instead of --grad_accum N (N times the steps, eval every N times as many).
    "trainer_small": "small",
    # The plain Trainer at half the task's batch over the same examples (twice the steps, evaluated after the same
    # examples as the Trainer): the smaller batch a user could pick instead of skipping half the backward passes.
    "trainer_half": "half",
    # The sceptic's controls for the prediction (the engine issue): the seed's fixed schedule with every
    # PREDICT step whole (no forward, no backward, every tensor), differing only in what goes into .grad
    # there: the AR prediction, a zero gradient (the optimizer coasts on its momentum), or none (no update).
    "predict_all": dict(FORCED, vsa_predict_mode="predict"),
    "coast": dict(FORCED, vsa_predict_mode="coast"),
    "skip": dict(FORCED, vsa_predict_mode="skip"),
    # Every skipping mechanism off (no PREDICT block, every micro-batch computed): what hf_vsa's recording
    # and measuring cost a backprop step (the engine issue: at most 2% over the Trainer's).
    "measure_only": {"vsa_predict_steps": 0, "vsa_adaptive_accumulation": False},
    # DropBP as its authors publish it (scripts/anchors.py): the plain Trainer dropping each block's attention
    # and MLP backward at random on every step, rates from measured sensitivities under a FLOPs budget (0.5).
    "dropbp_published": "dropbp",
    # What a user could turn on instead (the LLM issue): torch.compile for the plain Trainer, and for hf_vsa's default.
    # Compilation happens in the first steps and counts in the run's wall time, as it does for a user.
    "trainer_compile": "compile",
    "compile": {"torch_compile": True},
    # The plain Trainer again, after the other runs: the A/A control. Its ratios against the first run are
    # this machine's timing noise (same work, same trajectory), the yardstick for the others' small gaps.
    "trainer_again": None,
}


def rss_bytes():
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class StepClock(TrainerCallback):
    """Per optimizer step: wall time since the previous step ended, evaluation time excluded (and,
    in lockstep, the time spent waiting for the other runs' turns); peak memory over the run's steps
    (RSS sampled at step ends; CUDA: max allocated)."""

    def __init__(self, baton=None, turn=None):
        self.steps, self.evals, self.mark, self.eval_time, self.train_time = [], [], None, 0.0, 0.0
        self.peak_rss = 0
        self.baton, self.turn, self.waited = baton, turn, 0.0

    def on_train_begin(self, args, state, control, **kw):
        if torch.cuda.is_available() and self.baton is None:
            torch.cuda.reset_peak_memory_stats()
        self.mark = time.perf_counter()

    def on_step_begin(self, args, state, control, **kw):
        if self.baton is not None:  # lockstep: the other runs take their turn, one step each
            t = time.perf_counter()
            self.baton.hand_over(self.turn)
            self.waited += time.perf_counter() - t

    def on_step_end(self, args, state, control, **kw):
        self.peak_rss = max(self.peak_rss, rss_bytes())
        now = time.perf_counter()
        dt = now - self.mark - self.eval_time - self.waited
        self.train_time += dt
        self.steps.append(dt)
        self.mark, self.eval_time, self.waited = now, 0.0, 0.0

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if self.mark is None:  # the evaluation before training: step 0, wall 0
            self.evals.append({"step": 0, "wall": 0.0, "eval_loss": metrics["eval_loss"]})
            return
        self.eval_time += time.perf_counter() - self.mark - self.eval_time - self.waited
        self.evals.append({"step": state.global_step, "wall": self.train_time, "eval_loss": metrics["eval_loss"]})


def _global_state():
    """What training reads from process-wide state: the RNGs (the Trainer's sampler and dropout draw
    from them) and accelerate's GradientState, which every Accelerator shares (sync flag, number of
    accumulation steps, the active dataloader)."""
    shared = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
              for k, v in GradientState._shared_state.items()}
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "random": random.getstate(), "gradient_state": shared}


def _set_global_state(g):
    torch.set_rng_state(g["torch"])
    if g["cuda"] is not None:
        torch.cuda.set_rng_state_all(g["cuda"])
    np.random.set_state(g["numpy"])
    random.setstate(g["random"])
    GradientState._shared_state.clear()
    GradientState._shared_state.update(g["gradient_state"])


class Baton:
    """Lockstep: the runs of one seed, each in its own thread, take turns of one optimizer step, so
    that all of them meet the same machine. On a shared 2-core CPU the speed drifts by up to 20%
    between runs minutes apart (the plain Trainer against itself, run after the others: 0.82x to
    1.08x per step); turns of one step each see the same drift. Only the holder runs; each turn saves
    the process-wide state training reads (_global_state) at its end and restores it at its start,
    so every run follows the trajectory it follows alone (the quick-benchmark test checks it)."""

    def __init__(self, n):
        self.cond = threading.Condition()
        self.turn, self.done, self.saved = 0, [False] * n, [None] * n

    def save(self, i):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # this turn's kernels end inside it
        self.saved[i] = _global_state()

    def take(self, i):
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)
        _set_global_state(self.saved[i])

    def give(self, i, finished=False):
        self.save(i)
        with self.cond:
            self.done[i] = finished
            n = len(self.done)
            nxt = next((j % n for j in range(i + 1, i + 1 + n) if not self.done[j % n]), None)
            self.turn = i if nxt is None else nxt
            self.cond.notify_all()

    def hand_over(self, i):
        self.give(i)
        self.take(i)


def _without_tokenizer(task):
    model, _, train, evl = task
    return model, train, evl


# Per task: how to build (model, train, eval) and its training settings.
TASKS = {
    "sentiment": (lambda a: _without_tokenizer(sentiment_task(max_length=a.max_length, n_eval=a.n_eval, seed=a.seed)),
                  dict(steps=150, eval_every=10, batch=32, lr=1e-4, n_eval=512)),
    # Beyond the named tasks: the same model and settings on the 4,200 rated tweets.
    "tweets": (lambda a: _without_tokenizer(sentiment_task(dataset="tweets", max_length=a.max_length, n_eval=a.n_eval,
                                                           seed=a.seed)),
               dict(steps=150, eval_every=10, batch=32, lr=1e-4, n_eval=512)),
    "gpt2_scratch": (lambda a: gpt2_scratch_task(n_eval=a.n_eval, seed=a.seed),
                     dict(steps=300, eval_every=20, batch=16, lr=1e-3, n_eval=64)),
    # A 1B-class model from a config, for GPU checks (--quick: 2 layers of width 64, for the CPU dry run).
    "llama_1b": (lambda a: llama_scratch_task(n_eval=a.n_eval, seed=a.seed, **(dict(layers=2, width=64) if a.quick else {})),
                 dict(steps=30, eval_every=10, batch=8, lr=3e-4, n_eval=16)),
    "smollm": (lambda a: smollm_task(n_eval=a.n_eval, seed=a.seed),
               dict(steps=60, eval_every=10, batch=4, lr=5e-5, n_eval=32)),
    "smollm_lora": (lambda a: smollm_task(n_eval=a.n_eval, seed=a.seed, lora=True),
                    dict(steps=60, eval_every=10, batch=4, lr=5e-4, n_eval=32)),
}


def training_batches(a):
    """For the diagnostic scripts (block_energy.py, gradient_noise.py): fill task `a.task`'s defaults
    into `a` where unset, seed, build it; returns the model in train mode and a function giving the
    model inputs (tensors) of the training examples at the given indices."""
    build, defaults = TASKS[a.task]
    for k, v in defaults.items():
        setattr(a, k, getattr(a, k, None) or v)
    set_seed(a.seed)
    model, train, _ = build(a)
    model.train()
    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in train.column_names]

    def batch(indices):
        rows = train[indices]
        return {c: torch.tensor(rows[c]) for c in cols}
    return model, batch, len(train)


def make_trainer(name, overrides, a, callbacks):
    """The benchmark's run `name` on task a.task, seeded: the plain Trainer (overrides None) or a
    VSATrainer with these vsa_* overrides. Also used by step_cost.py, so both time the same run."""
    set_seed(a.seed)
    model, train, evl = TASKS[a.task][0](a)
    accum = a.grad_accum
    common = dict(output_dir=os.path.join(a.workdir, name), max_steps=a.steps, per_device_train_batch_size=a.batch,
                  per_device_eval_batch_size=32, learning_rate=a.lr, lr_scheduler_type="constant",
                  eval_strategy="steps", eval_steps=a.eval_every, logging_steps=1, save_strategy="no",
                  report_to="none", seed=a.seed, disable_tqdm=True, max_grad_norm=1.0, use_cpu=a.cpu,
                  gradient_accumulation_steps=accum)
    if overrides == "small":  # the same examples in accum times the steps of the task's own batch
        common.update(max_steps=a.steps * accum, eval_steps=a.eval_every * accum, gradient_accumulation_steps=1)
        overrides = None
    if overrides == "half":  # the same examples in twice the steps of half the batch
        common.update(max_steps=a.steps * 2, eval_steps=a.eval_every * 2, per_device_train_batch_size=a.batch // 2)
        overrides = None
    factor = getattr(a, "steps_factor", {}).get(name)
    if factor is not None:  # this run's own length (--steps_factor), evaluations as often
        common.update(max_steps=round(a.steps * factor))
    if overrides == "dropbp":
        from anchors import DropBPTrainer
        return DropBPTrainer(model=model, args=VSATrainingArguments(**common, vsa_enabled=False), train_dataset=train,
                             eval_dataset=evl, callbacks=list(callbacks))
    if overrides == "compile":
        common.update(torch_compile=True)
        overrides = None
    if overrides is None:
        args = VSATrainingArguments(**common, vsa_enabled=False)
        cls = Trainer
    else:
        if a.quick:  # a schedule short enough that 12 steps reach PREDICT and CORRECT
            overrides = {**dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=4,
                                vsa_correct_every=2), **overrides}
        common.update(max_steps=round(a.steps * (a.vsa_steps_factor if factor is None else factor)))
        args = VSATrainingArguments(**common, **overrides)
        cls = VSATrainer
    return cls(model=model, args=args, train_dataset=train, eval_dataset=evl, callbacks=list(callbacks))


def run_one(name, overrides, a):
    clock = StepClock()
    trainer = make_trainer(name, overrides, a, [clock])
    log = BackwardLog(trainer)
    trainer.evaluate()  # step-0 eval loss; also warms up the evaluation path outside the clock
    trainer.train()
    return record(name, overrides, trainer, clock, log=log)


def run_lockstep(names, configs, a):
    """Every config of one seed at once, one thread each, taking turns of one optimizer step (Baton).
    Peak memory is the process's, shared by all of them: not recorded per run."""
    baton = Baton(len(names))
    built = []
    for i, n in enumerate(names):
        clock = StepClock(baton, i)
        trainer = make_trainer(n, configs[n], a, [clock])
        built.append((trainer, clock, BackwardLog(trainer)))
        baton.save(i)  # the state its run starts from, as when it runs alone right after make_trainer
    runs, errors = [None] * len(names), []

    def body(i):
        baton.take(i)
        try:
            trainer, clock, log = built[i]
            trainer.evaluate()
            trainer.train()
            runs[i] = record(names[i], configs[names[i]], trainer, clock, lockstep=True, log=log)
        except BaseException as e:  # re-raised below, after the other runs have ended
            errors.append(e)
        finally:
            baton.give(i, finished=True)
    threads = [threading.Thread(target=body, args=(i,), name=f"bench-{n}") for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return runs


def record(name, overrides, trainer, clock, lockstep=False, log=None):
    """A finished run's measurements, as the JSON keeps them (`log`: its BackwardLog, counted here,
    off the clock)."""
    engine = getattr(trainer, "vsa", None)  # None: the plain Trainer, or VSATrainer with vsa_enabled=False
    if engine is not None:
        engine.refresh_noise(decide=False)  # the noise estimate at the end, for the record below
    phases = engine.phases if engine else ["FULL"] * len(clock.steps)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    counts = engine.controller.counts if engine else {"FULL": len(clock.steps)}
    backward = len(clock.steps) - counts.get("PREDICT", 0)
    vsa = engine.stats() if engine else {}
    return {"name": name, "overrides": overrides, "step_wall": clock.steps, "phase": phases,
            "train_loss": losses, "evals": clock.evals, "train_wall": clock.train_time,
            "final_eval_loss": clock.evals[-1]["eval_loss"], "backward_fraction": backward / len(clock.steps),
            "backward_flops": None if log is None else log.total(),
            "peak_rss_bytes": None if lockstep else clock.peak_rss,
            "prediction_cosine_mean": vsa.get("vsa/prediction_cosine_mean"),
            "state_memory_ratio": vsa.get("vsa/state_memory_ratio"),
            "state_memory_peak_ratio": vsa.get("vsa/state_memory_peak_ratio"),
            "tracked_tensor_fraction": vsa.get("vsa/tracked_tensor_fraction"),
            "noise_scale": vsa.get("vsa/noise_scale"), "batch_over_noise_scale": vsa.get("vsa/batch_over_noise_scale"),
            "mean_share": vsa.get("vsa/mean_share"),
            "whole_steps": len(engine.whole_steps) if engine else 0,
            "dropbp_rates": getattr(trainer, "rates", None),  # DropBP as published: the rates at the end
            "examples_per_step": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps,
            # per block, at the end: the drop probabilities in use and the measured lag-1 gradient cosines
            "block_drop": list(engine.drop) if engine else None,
            "block_consistency": engine.consistency.mean[:-1].tolist() if engine else None,  # host sync: once
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() and not lockstep
            else None}


def reached(run, target):
    """The run's first evaluation at or below target (its step, wall and eval loss), or None."""
    return next((e for e in run["evals"] if e["eval_loss"] <= target), None)


def time_to(run, target):
    """Training wall time of the first evaluation at or below target, or None."""
    e = reached(run, target)
    return None if e is None else e["wall"]


def loss_at_wall(run, wall):
    """Eval loss of the last evaluation made within `wall` seconds of training."""
    done = [e for e in run["evals"] if e["wall"] <= wall + 1e-9]
    return done[-1]["eval_loss"] if done else None


def loss_at_wall_interpolated(run, wall):
    """Eval loss at `wall` seconds of training, linear between the two evaluations around it; None
    past the run's last evaluation."""
    evals = run["evals"]
    for e0, e1 in zip(evals, evals[1:]):
        if e0["wall"] <= wall <= e1["wall"]:
            span = e1["wall"] - e0["wall"]
            f = (wall - e0["wall"]) / span if span > 0 else 1.0
            return e0["eval_loss"] + f * (e1["eval_loss"] - e0["eval_loss"])
    return None


def loss_at_step(run, step):
    """Eval loss of the run's evaluation at optimizer step `step`, or None."""
    return next((e["eval_loss"] for e in run["evals"] if e["step"] == step), None)


def late_eval_vs_trainer(run, base, k=5):
    """Mean of the run's eval losses at the Trainer's (base's) last k evaluations over the Trainer's,
    minus 1: equal steps, and less noisy than the final evaluation alone (on 8x sentiment the Trainer's
    own eval loss moved by 11% from one evaluation to the next). A run that reads its evaluations
    elsewhere (trainer_small, trainer_half: the same examples in more, smaller steps) is read at its last k."""
    steps = [e["step"] for e in base["evals"][-k:]]
    mine = {e["step"]: e["eval_loss"] for e in run["evals"]}
    same = run.get("examples_per_step") == base.get("examples_per_step") and all(s in mine for s in steps)
    xs = [mine[s] for s in steps] if same else [e["eval_loss"] for e in run["evals"][-k:]]
    theirs = [e["eval_loss"] for e in base["evals"][-k:]]
    return (sum(xs) / len(xs)) / (sum(theirs) / len(theirs)) - 1.0


def _ratio(x, y):
    return None if x is None or not y else x / y


def summarize(runs):
    base = runs[0]
    target = base["final_eval_loss"]
    per_step = sum(base["step_wall"]) / len(base["step_wall"])
    rows = []
    for r in runs:
        t = time_to(r, target)
        # equal steps: the run's evaluation at the Trainer's last step (a longer run's, not its final one;
        # trainer_small, trainer_half: its final one, after the same examples); equal wall: both runs interpolated at the
        # shorter of the two training times
        steps = len(base["step_wall"]) if r.get("examples_per_step") == base.get("examples_per_step") else None
        at_steps = (loss_at_step(r, steps) if steps else None) or r["final_eval_loss"]
        wall = min(r["train_wall"], base["train_wall"])
        mine, theirs = loss_at_wall_interpolated(r, wall), loss_at_wall_interpolated(base, wall)
        rows.append({
            "name": r["name"],
            "step_time_ratio": per_step / (sum(r["step_wall"]) / len(r["step_wall"])),
            "time_to_target_ratio": None if t is None else t / base["train_wall"],
            "final_eval_loss": r["final_eval_loss"],
            "eval_loss_at_trainer_steps": at_steps,
            "eval_loss_vs_trainer": at_steps / target - 1.0,
            "last5_eval_vs_trainer": late_eval_vs_trainer(r, base),
            "trainer_eval_loss_at_same_wall": loss_at_wall(base, r["train_wall"]),
            # the Trainer's eval loss at this run's training wall time, interpolated between its evaluations
            "vs_trainer_at_same_wall": None if mine is None or theirs is None else mine / theirs - 1.0,
            "noise_scale": r.get("noise_scale"), "batch_over_noise_scale": r.get("batch_over_noise_scale"),
            "whole_steps": r.get("whole_steps", 0), "steps": len(r["step_wall"]),
            "backward_fraction": r["backward_fraction"],
            # backward FLOPs run over the whole run (counted: backward_flops.py), over the Trainer's
            "backward_flops_ratio": _ratio(r.get("backward_flops"), base.get("backward_flops")),
            "train_wall": r["train_wall"],
            "peak_rss_gb": None if r["peak_rss_bytes"] is None else r["peak_rss_bytes"] / 2**30,
            "prediction_cosine_mean": r.get("prediction_cosine_mean"),
            "state_memory_ratio": r.get("state_memory_ratio"),
            "cuda_max_allocated_gb": None if r["cuda_max_allocated_bytes"] is None else r["cuda_max_allocated_bytes"] / 2**30,
        })
    return {"target_eval_loss": target, "rows": rows}


def print_table(summary):
    print(f"\ntarget = Trainer's final eval loss {summary['target_eval_loss']:.4f}")
    print(f"{'run':<16}{'step-time x':>12}{'time-to-target':>16}{'final eval':>12}{'vs Trainer':>12}"
          f"{'vs Trainer@wall':>17}{'backward':>10}{'whole':>7}{'B/B_noise':>11}{'wall s':>9}{'peak RSS GB':>13}")
    for r in summary["rows"]:
        ttt = "not reached" if r["time_to_target_ratio"] is None else f"{r['time_to_target_ratio']:.2f}x"
        same = r.get("vs_trainer_at_same_wall")
        ratio = r.get("batch_over_noise_scale")
        rss = "-" if r["peak_rss_gb"] is None else f"{r['peak_rss_gb']:.2f}"  # lockstep: not per run
        print(f"{r['name']:<16}{r['step_time_ratio']:>11.2f}x{ttt:>16}{r['final_eval_loss']:>12.4f}"
              f"{r['eval_loss_vs_trainer']:>+11.1%} {'-' if same is None else f'{same:+.1%}':>16}"
              f"{r['backward_fraction']:>10.2f}{r.get('whole_steps', 0):>7}{'-' if ratio is None else f'{ratio:.2f}':>11}"
              f"{r['train_wall']:>9.1f}{rss:>13}"
              + ("" if r["cuda_max_allocated_gb"] is None else f"  CUDA max {r['cuda_max_allocated_gb']:.2f} GB"))


def spread(summaries):
    """Mean, min and max over seeds of each ratio, per config."""
    out = {}
    for i, row in enumerate(summaries[0]["rows"]):
        vals = {}
        for key in ("step_time_ratio", "time_to_target_ratio", "eval_loss_vs_trainer", "last5_eval_vs_trainer",
                    "backward_fraction", "vs_trainer_at_same_wall", "batch_over_noise_scale"):
            xs = [s["rows"][i].get(key) for s in summaries]
            got = [x for x in xs if x is not None]
            vals[key] = {"mean": sum(got) / len(got) if got else None, "min": min(got, default=None),
                         "max": max(got, default=None), "reached": len(got), "of": len(xs)}
        out[row["name"]] = vals
    return out


def print_spread(sp):
    print("\n-- over seeds: mean [min, max]")
    fmt = lambda v, f: "-" if v["mean"] is None else f"{f(v['mean'])} [{f(v['min'])}, {f(v['max'])}]"
    for name, v in sp.items():
        ttt = fmt(v["time_to_target_ratio"], lambda x: f"{x:.2f}x")
        print(f"{name:<14} step-time {fmt(v['step_time_ratio'], lambda x: f'{x:.2f}x')}  "
              f"time-to-target {ttt} (reached {v['time_to_target_ratio']['reached']}/{v['time_to_target_ratio']['of']})  "
              f"final eval vs Trainer {fmt(v['eval_loss_vs_trainer'], lambda x: f'{x:+.1%}')}  "
              f"last 5 evals vs Trainer at equal steps {fmt(v['last5_eval_vs_trainer'], lambda x: f'{x:+.1%}')}")


def report(paths):
    """Markdown rows (one per task and config) from saved benchmark JSONs: mean [min, max] over seeds."""
    print("| task | config | step-time ratio | time to Trainer's final eval loss | final eval loss vs Trainer "
          "| mean of last 5 evals vs Trainer, equal steps | full-backward fraction | peak RSS GB | seeds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        d = json.load(open(path))
        for i, (name, v) in enumerate(d["spread"].items()):
            late = [late_eval_vs_trainer(s["runs"][i], s["runs"][0]) for s in d["seeds"]]  # (files before it was summarised)
            v = {**v, "last5_eval_vs_trainer": {"mean": sum(late) / len(late), "min": min(late), "max": max(late)}}
            rss = [s["summary"]["rows"][i].get("peak_rss_gb") for s in d["seeds"]]
            rss = "-" if None in rss else f"{sum(rss) / len(rss):.2f}"  # runs before it was recorded: -

            def f(key, fmt):
                x = v[key]
                return "not reached" if x["mean"] is None else (
                    fmt(x["mean"]) if x["min"] == x["max"] else f"{fmt(x['mean'])} [{fmt(x['min'])}, {fmt(x['max'])}]")
            ttt = f("time_to_target_ratio", lambda x: f"{x:.2f}x")
            if v["time_to_target_ratio"]["mean"] is not None:
                ttt += f" (reached {v['time_to_target_ratio']['reached']}/{v['time_to_target_ratio']['of']})"
            print(f"| {d['task']} | {name} | {f('step_time_ratio', lambda x: f'{x:.2f}x')} | {ttt} | "
                  f"{f('eval_loss_vs_trainer', lambda x: f'{x:+.1%}')} | {f('last5_eval_vs_trainer', lambda x: f'{x:+.1%}')} "
                  f"| {f('backward_fraction', lambda x: f'{x:.2f}')} "
                  f"| {rss} | {','.join(str(s['seed']) for s in d['seeds'])} |")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sentiment", choices=list(TASKS))
    p.add_argument("--configs", default="trainer,default,sketch",
                   help=f"comma-separated, first is the reference; known: {', '.join(CONFIGS)}")
    p.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="define an extra config, e.g. --set 'fast:vsa_predict_steps=30'")
    p.add_argument("--steps", type=int, help="optimizer steps (task default)")
    p.add_argument("--eval_every", type=int, help="evaluate every N steps (task default)")
    p.add_argument("--batch", type=int, help="per-device batch size (task default)")
    p.add_argument("--vsa_steps_factor", type=float, default=1.0,
                   help="VSATrainer runs this many times the Trainer's steps, so that a run slower per step can "
                        "still reach the Trainer's final eval loss (time to it is then measured, not censored); "
                        "'vs Trainer' compares at the Trainer's last step")
    p.add_argument("--steps_factor", action="append", default=[], metavar="NAME=FACTOR",
                   help="run NAME for FACTOR times the Trainer's steps (any config; for hf_vsa's it replaces "
                        "--vsa_steps_factor)")
    p.add_argument("--grad_accum", type=int, default=1,
                   help="gradient accumulation steps: an effective batch of N times --batch (default steps: "
                        "2 * task steps / N, so the Trainer sees twice the task's examples)")
    p.add_argument("--lr", type=float, help="AdamW learning rate, constant schedule (task default)")
    p.add_argument("--n_eval", type=int, help="held-out examples or blocks (task default)")
    p.add_argument("--max_length", type=int, default=48, help="sentiment: tokens per snippet")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each runs every config")
    p.add_argument("--cpu", action="store_true", help="force CPU even where CUDA is available")
    p.add_argument("--warmup_steps", type=int, default=10,
                   help="untimed plain-Trainer steps run first in the process, so that no timed run pays the "
                        "process's cold start alone (measured: the first Trainer run of a process took up to "
                        "1.5x the time of the same run repeated later); 0: none")
    p.add_argument("--lockstep", action="store_true",
                   help="run a seed's configs at once, taking turns of one optimizer step, so that all of them meet "
                        "the same machine speed (timing noise on shared CPUs); peak memory is then not recorded")
    p.add_argument("--quick", action="store_true", help="smoke test: 12 steps, 64 eval examples")
    p.add_argument("--out", default="bench_out/benchmark.json")
    p.add_argument("--workdir", default="bench_out/runs")
    p.add_argument("--report", nargs="+", metavar="JSON", help="print the markdown results table of saved runs and exit")
    a = p.parse_args(argv)
    if a.grad_accum < 1:
        p.error(f"--grad_accum must be >= 1, got {a.grad_accum}")
    if a.warmup_steps < 0:
        p.error(f"--warmup_steps must be >= 0 (0: no warm-up), got {a.warmup_steps}")
    defaults = dict(TASKS[a.task][1])
    if a.grad_accum > 1:  # twice the task's examples, in about ten evaluations that end on the last step
        steps = -(-2 * defaults["steps"] // a.grad_accum)
        defaults["eval_every"] = max(2, round(steps / 10))
        defaults["steps"] = -(-steps // defaults["eval_every"]) * defaults["eval_every"]
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.steps, a.eval_every, a.n_eval, a.batch = 12, 6, min(a.n_eval, 32), min(a.batch, 8)
        a.warmup_steps = min(a.warmup_steps, 2)
    a.seeds = [int(x) for x in a.seeds.split(",")]
    try:
        a.steps_factor = {n: float(f) for n, f in (spec.split("=", 1) for spec in a.steps_factor)}
    except ValueError:
        raise SystemExit(f"--steps_factor: expected NAME=FACTOR (a number), got {a.steps_factor}")
    return a


def parse_value(v):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def command_line(argv, out):
    """The command that reproduces this run, from the repository root (--out made root-relative)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = list(argv)
    if "--out" in argv:
        argv[argv.index("--out") + 1] = os.path.relpath(os.path.abspath(out), root)
    return " ".join(["python scripts/benchmark.py", *argv])


def versions():
    """The packages' versions, and hf_vsa's commit where it runs from a git checkout (None elsewhere)."""
    import subprocess
    from importlib.metadata import version
    out = {k: version(k) for k in ("hf_vsa", "torch", "transformers", "accelerate")}
    import hf_vsa
    try:
        out["hf_vsa_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=os.path.dirname(hf_vsa.__file__), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["hf_vsa_commit"] = None
    return out


def write(a, argv_used, per_seed):
    """The results file of the seeds run so far (written whole, then moved into place)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.cpu else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    result = {"task": a.task, "device": device, "args": vars(a), "seeds": per_seed,
              "spread": spread([s["summary"] for s in per_seed]),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "versions": versions(),
              "command": command_line(argv_used, a.out)}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(a.out + ".tmp", a.out)
    return result


def main(argv=None):
    argv_used = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.report:
        return report(a.report)
    configs = dict(CONFIGS)
    for spec in a.set:
        name, _, kvs = spec.partition(":")
        configs[name] = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in kvs.split(",") if kv)}
    names = a.configs.split(",")
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {sorted(configs)}")
    if configs[names[0]] is not None:
        raise SystemExit("--configs: the first entry is the reference and must be 'trainer'")
    if "trainer_small" in names and a.grad_accum == 1:
        raise SystemExit("--configs: trainer_small is the Trainer without --grad_accum; pass --grad_accum N > 1")
    if "trainer_half" in names and (a.batch < 2 or a.batch % 2):
        raise SystemExit(f"--configs: trainer_half halves the batch; --batch must be even and >= 2, got {a.batch}")
    torch.set_num_threads(os.cpu_count() or 1)
    if a.warmup_steps > 0:
        print(f"== {a.task}: warm-up, {a.warmup_steps} untimed Trainer steps", flush=True)
        warm = argparse.Namespace(**{**vars(a), "steps": a.warmup_steps, "eval_every": a.warmup_steps + 1,
                                     "seed": a.seeds[0]})
        make_trainer("warmup", None, warm, []).train()
    per_seed = []
    for seed in a.seeds:
        a.seed = seed
        runs = []
        if a.lockstep:
            print(f"== {a.task} seed {seed}: {', '.join(names)} in lockstep", flush=True)
            runs = run_lockstep(names, configs, a)
        for n in names if not a.lockstep else []:
            print(f"== {a.task} seed {seed}: {n}", flush=True)
            runs.append(run_one(n, configs[n], a))
        per_seed.append({"seed": seed, "summary": summarize(runs), "runs": runs})
        result = write(a, argv_used, per_seed)  # after every seed: a stopped run keeps the seeds it finished
    device = result["device"]
    print(f"\ntask: {a.task}; device: {device}; torch {torch.__version__}")
    for s in per_seed:
        print(f"\n-- seed {s['seed']}")
        print_table(s["summary"])
    if len(per_seed) > 1:
        print_spread(result["spread"])
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
