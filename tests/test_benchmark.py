"""Smoke test of the benchmark on the real task in --quick mode: it runs, measures and reports."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_quick_benchmark_writes_measured_ratios(tmp_path):
    out = tmp_path / "b.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--quick", "--configs", "trainer,default,trainer_again",
                           "--out", str(out), "--workdir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step-time x" in done.stdout and "time-to-target" in done.stdout
    data = json.loads(out.read_text())
    (seed,) = data["seeds"]
    trainer, default, again = seed["runs"]
    assert len(trainer["step_wall"]) == len(default["step_wall"]) == 12
    # the A/A control is the same work: the same trajectory, only its timing differs
    assert again["train_loss"] == trainer["train_loss"] and again["evals"][-1]["eval_loss"] == trainer["final_eval_loss"]
    assert set(trainer["phase"]) == {"FULL"} and "CORRECT" in default["phase"], default["phase"]
    # the default at one micro-batch a step skips nothing: the Trainer's trajectory
    assert default["train_loss"] == trainer["train_loss"] and default["final_eval_loss"] == trainer["final_eval_loss"]
    row = seed["summary"]["rows"][1]
    assert row["step_time_ratio"] > 0 and row["peak_rss_gb"] > 0
    late = [sum(e["eval_loss"] for e in r["evals"][-5:]) / 5 for r in (trainer, default)]
    assert abs(row["last5_eval_vs_trainer"] - (late[1] / late[0] - 1)) < 1e-12
    assert seed["summary"]["rows"][0]["last5_eval_vs_trainer"] == 0.0
    report = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--report", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert "| sentiment | default |" in report.stdout and f"| {late[1] / late[0] - 1:+.1%} |" in report.stdout
    png = tmp_path / "b.png"
    plot = subprocess.run([sys.executable, str(SCRIPTS / "plot_benchmark.py"), str(out), "--out", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_lockstep_runs_follow_the_trajectories_they_follow_alone(tmp_path):
    # Lockstep runs a seed's configs in threads taking turns of one step; each turn restores the RNGs and
    # accelerate's shared GradientState it left. Accumulation on (the default and the Trainer: 2 micro-batches)
    # next to trainer_small (1): runs whose shared state differs.
    data = {}
    for mode in ("alone", "lockstep"):
        out = tmp_path / f"{mode}.json"
        done = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--quick", "--grad_accum", "2",
                               "--configs", "trainer,default,trainer_small", "--warmup_steps", "0", "--out", str(out),
                               "--workdir", str(tmp_path / mode)] + (["--lockstep"] if mode == "lockstep" else []),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        data[mode] = json.loads(out.read_text())["seeds"][0]
    for alone, lock in zip(data["alone"]["runs"], data["lockstep"]["runs"]):
        assert lock["name"] == alone["name"]
        assert lock["train_loss"] == alone["train_loss"] and lock["phase"] == alone["phase"], lock["name"]
        assert [e["eval_loss"] for e in lock["evals"]] == [e["eval_loss"] for e in alone["evals"]], lock["name"]
        assert len(lock["step_wall"]) == len(alone["step_wall"]) and min(lock["step_wall"]) > 0
        assert lock["peak_rss_bytes"] is None  # one process for all runs: not a per-run figure
    rows = data["lockstep"]["summary"]["rows"]
    assert rows[0]["step_time_ratio"] == 1.0 and all(r["step_time_ratio"] > 0 for r in rows)


def test_quick_memory_benchmark_measures_every_kind_against_none(tmp_path):
    out = tmp_path / "m.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "diagnostics" / "bench_memory.py"), "--quick", "--seeds", "0",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    (model,) = data["models"]
    rows = {r["kind"]: r for r in model["rows"]}
    assert set(rows) == {"none", "ternary", "vsa"}
    assert rows["none"]["state_ratio"] > rows["ternary"]["state_ratio"] > rows["vsa"]["state_ratio"]
    assert rows["none"]["fit_cosine_vs_none"] > 0.999
    assert all(r["compress_gbs"] > 0 and -1 <= r["predicted_vs_actual_cosine"] <= 1 for r in rows.values())
    train = {r["kind"]: r for r in data["training"]["sentiment"]}
    assert set(train) == {"none", "ternary", "vsa"} and train["none"]["eval_vs_none"] == 0
    assert train["ternary"]["state_ratio"] < train["none"]["state_ratio"]


def test_gradient_noise_measures_cosines_against_the_actual_gradient(tmp_path):
    sys.path.insert(0, str(SCRIPTS / "diagnostics"))
    from gradient_noise import cosines
    import torch
    x, y = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])], [torch.tensor([1.0, 0.0]), torch.tensor([0.0, -1.0])]
    whole, per = cosines(x, y)
    assert per == [1.0, -1.0] and abs(whole - (1 - 3) / (10 ** 0.5 * 2 ** 0.5)) < 1e-12  # energy-weighted
    out = tmp_path / "n.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "diagnostics" / "gradient_noise.py"), "--task", "sentiment", "--steps", "5",
                           "--skip", "2", "--lags", "2", "--batch", "4", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["step"] for r in data["rows"]] == [2, 3, 4]
    assert all(-1 <= r[k] <= 1 for r in data["rows"] for k in ("prev", "lag2", "ema", "wls", "wls_median", "ar",
                                                              "ar_ternary", "ar_int4", "ar2", "secant", "secant_whole"))
    assert data["ceiling"] == max(data["mean"]["prev"], 0) ** 0.5
    assert "ceiling for any prediction" in done.stdout


def test_late_evals_compare_a_longer_run_at_the_trainers_steps():
    sys.path.insert(0, str(SCRIPTS))
    from benchmark import late_eval_vs_trainer
    evals = lambda losses, every: [{"step": i * every, "eval_loss": x} for i, x in enumerate(losses)]
    base = {"examples_per_step": 8, "evals": evals([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], 2)}  # steps 0..10
    longer = {"examples_per_step": 8, "evals": evals([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05], 2)}
    # the same losses at the Trainer's steps 2..10: equal, whatever the longer run reaches later
    assert late_eval_vs_trainer(longer, base) == 0.0
    worse = {"examples_per_step": 8, "evals": evals([1.0, 1.1, 1.0, 0.9, 0.8, 0.7, 0.1], 2)}
    assert abs(late_eval_vs_trainer(worse, base) - (4.5 / 3.5 - 1)) < 1e-12
    # another batch (trainer_small): its own last 5 evaluations, made after the same examples
    small = {"examples_per_step": 1, "evals": evals([1.0, 0.8, 0.8, 0.8, 0.8, 0.8], 16)}
    assert abs(late_eval_vs_trainer(small, base) - (4.0 / 3.5 - 1)) < 1e-12


def test_steps_factor_gives_any_config_its_own_length(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    from benchmark import make_trainer, parse
    a = parse(["--quick", "--steps_factor", "dropbp_published=2", "--steps_factor", "skip=0.5", "--vsa_steps_factor", "3",
               "--workdir", str(tmp_path)])
    a.seed = 0
    assert a.steps == 12
    assert make_trainer("dropbp_published", "dropbp", a, []).args.max_steps == 24  # the plain Trainer's kin too
    assert make_trainer("skip", {"vsa_predict_mode": "skip"}, a, []).args.max_steps == 6  # replaces --vsa_steps_factor
    assert make_trainer("default", {}, a, []).args.max_steps == 36
    assert make_trainer("trainer", None, a, []).args.max_steps == 12
    with pytest.raises(SystemExit, match="--steps_factor: expected NAME=FACTOR"):
        parse(["--steps_factor", "skip:2"])


def test_trainer_half_sees_the_same_examples_in_twice_the_steps_of_half_the_batch(tmp_path):
    out = tmp_path / "h.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--quick", "--configs", "trainer,trainer_half",
                           "--lockstep", "--warmup_steps", "0", "--out", str(out), "--workdir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seed = json.loads(out.read_text())["seeds"][0]
    trainer, half = seed["runs"]
    assert half["examples_per_step"] * 2 == trainer["examples_per_step"] == 8
    assert len(half["step_wall"]) == 2 * len(trainer["step_wall"]) == 24
    # evaluated after the same examples as the Trainer, and compared there
    seen = lambda run: [e["step"] * run["examples_per_step"] for e in run["evals"]]
    assert seen(half) == seen(trainer) == [0, 48, 96]
    row = seed["summary"]["rows"][1]
    assert row["eval_loss_at_trainer_steps"] == half["final_eval_loss"]
    late = [sum(e["eval_loss"] for e in r["evals"][-5:]) / len(r["evals"][-5:]) for r in (trainer, half)]
    assert abs(row["last5_eval_vs_trainer"] - (late[1] / late[0] - 1)) < 1e-12
    odd = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--configs", "trainer,trainer_half", "--batch", "5",
                          "--out", str(tmp_path / "x.json"), "--workdir", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert odd.returncode != 0 and "--batch must be even and >= 2, got 5" in odd.stderr


def test_secant_step_is_exact_on_a_quadratic_within_the_span_of_the_steps():
    # g(theta) = A theta: y_j = A s_j, so H s = A s for any step s the recorded steps span.
    sys.path.insert(0, str(SCRIPTS / "diagnostics"))
    from gradient_noise import secant
    import torch
    gen = torch.Generator().manual_seed(0)
    A = [torch.randn(6, 6, generator=gen, dtype=torch.float64), torch.randn(4, 4, generator=gen, dtype=torch.float64)]
    S = [[torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
         for _ in range(3)]
    Y = [[a @ s for a, s in zip(A, pair)] for pair in S]
    now = [sum(c * pair[i] for c, pair in zip((0.5, -1.0, 2.0), S)) for i in range(2)]
    # per tensor, and with one H for the whole model (the same step coefficients in every tensor here)
    for per_tensor in (True, False):
        for a, s, h in zip(A, now, secant(S, Y, now, per_tensor=per_tensor, ridge=1e-12)):
            torch.testing.assert_close(h, a @ s, rtol=1e-6, atol=1e-8)
    assert all(not x.any() for x in secant([], [], now))


def test_step_cost_splits_a_real_trainer_step_and_bounds_any_forward_keeping_speedup(tmp_path):
    sys.path.insert(0, str(SCRIPTS / "diagnostics"))
    from step_cost import ceiling, max_backprop_share_for
    assert ceiling(1.0, 0.3) == 1.0 and ceiling(0.0, 0.5) == 2.0
    assert max_backprop_share_for(2.0, 0.5) is None and max_backprop_share_for(2.0, 0.6) is None
    p = max_backprop_share_for(2.0, 0.25)
    assert abs(p - 1 / 3) < 1e-12 and abs(ceiling(p, 0.25) - 2.0) < 1e-12
    out = tmp_path / "c.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "diagnostics" / "step_cost.py"), "--quick", "--tasks", "gpt2_scratch",
                           "--out", str(out), "--workdir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["tasks"]
    m = row["median_seconds"]
    assert row["steps_timed"] == 4 and m["forward"] > 0 and m["backward"] > 0 and m["rest"] >= 0
    assert m["forward"] + m["backward"] <= m["step"] + 1e-9
    assert m["forward_no_grad"] > 0
    assert abs(row["floor_share"] - (min(m["forward"], m["forward_no_grad"]) + m["rest"]) / m["step"]) < 1e-12
    bounds = [row["ceiling"][k] for k in ("0.0", "0.25", "0.4")]
    assert bounds == sorted(bounds, reverse=True) and bounds[0] > 1
    assert all(abs(row["ceiling"][k] - ceiling(float(k), row["floor_share"])) < 1e-12 for k in row["ceiling"])
    assert "| gpt2_scratch |" in done.stdout


def test_gpu_check_runs_its_dry_mode_without_a_gpu(tmp_path):
    # CI has no GPU: the prepared check says so and runs the same steps at --quick sizes on the CPU.
    import os
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real check is run by hand (scripts/gpu_check.sh)")
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no CUDA device: dry run" in done.stdout
    for name in ("step_cost.json", "sentiment.json", "large_batch_gpt2_scratch.json"):
        data = json.loads((tmp_path / name).read_text())
        assert data
