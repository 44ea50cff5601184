"""The cost sections of docs/results.md (scripts/docs.py writes them): what hf_vsa adds to a step, counted, and
what a whole-step run's steps cost by phase, timed in the benchmark's own runs."""
import glob
import json
import os
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("WARMUP", "FULL", "PREDICT", "CORRECT")


def task_files(kind, task):
    """results/<kind>_<task>.json and its later seeds (<kind>_<task>_seeds_*.json), in order."""
    return sorted(glob.glob(os.path.join(ROOT, "results", f"{kind}_{task}.json"))
                  + glob.glob(os.path.join(ROOT, "results", f"{kind}_{task}_seeds_*.json")))


def task_seeds(kind, task):
    """Every seed of a task's <kind> files (task_files), in order."""
    return [s for f in task_files(kind, task) for s in json.load(open(f))["seeds"]]


def _span(xs, fmt):
    lo, hi, mean = min(xs), max(xs), sum(xs) / len(xs)
    return fmt(mean) if fmt(lo) == fmt(hi) else f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def phase_cost_table(tasks) -> str:
    """Per task and hf_vsa run of its anchors files that has PREDICT steps: the median wall time of its steps in
    each phase over the median of the Trainer's steps in the same seed (lockstep: the same machine speed), mean
    [min, max] over seeds, and that phase's share of the run's training time. Where a PREDICT step is not far
    below 1x, skipping the backward saves nothing; where backprop steps are above 1x, recording costs."""
    lines = ["| task | run | " + " | ".join(PHASES) + " | seeds |", "|---" * (len(PHASES) + 3) + "|"]
    for task in tasks:
        seeds = task_seeds("anchors", task)
        if not seeds:
            continue
        names = [r["name"] for r in seeds[0]["runs"] if "PREDICT" in r["phase"]]
        for name in names:
            cells = {p: ([], []) for p in PHASES}
            for s in seeds:
                base = statistics.median(s["runs"][0]["step_wall"])
                run = next(r for r in s["runs"] if r["name"] == name)
                for p in PHASES:
                    walls = [w for ph, w in zip(run["phase"], run["step_wall"]) if ph == p]
                    if walls:
                        cells[p][0].append(statistics.median(walls) / base)
                        cells[p][1].append(sum(walls) / sum(run["step_wall"]))
            row = [f"{_span(x, lambda v: f'{v:.2f}x')}, {_span(y, lambda v: f'{v:.0%}')}" if x else "-"
                   for x, y in cells.values()]
            lines.append(f"| {task} | {name} | " + " | ".join(row) + f" | {', '.join(str(s['seed']) for s in seeds)} |")
    return "\n".join(lines) + "\n"


def cost_section() -> str:
    """What hf_vsa adds to a step, counted (results/op_counts*.json, scripts/diagnostics/count_ops.py), and its
    peak memory (results/peak_memory*.json, scripts/diagnostics/peak_memory.py)."""
    lines = ["## Cost per step, counted", "",
             "The aten ops (GPU kernel launches; views excluded) and host syncs hf_vsa's own code dispatches per "
             "optimizer step, by phase (median over the run's steps of that phase), against the plain Trainer's "
             "whole step, on a GPT-2 from config with gradient accumulation 2; the ops should not grow with the "
             "number of tensors. Counted with `hf_vsa.counting.OpCounter`.", ""]
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "op_counts*.json"))):
        data = json.load(open(path))
        sets = data["args"].get("set") or []
        cmd = "python scripts/diagnostics/count_ops.py" + "".join(f" --set {x}" for x in sets) + \
            f" --out results/{os.path.basename(path)}"
        lines += [f"### `results/{os.path.basename(path)}`: " + ("defaults" if not sets else ", ".join(sets)), "",
                  f"`{cmd}`", "",
                  "| layers (tensors) | Trainer step: ops | phase | steps | hf_vsa ops, median (share of the "
                  "Trainer's step) | max | hf_vsa syncs, max per step |", "|---|---|---|---|---|---|---|"]
        runs = data["runs"]
        for r in runs:
            for phase, x in r["phases"].items():
                lines.append(f"| {r['layers']} ({r['tensors']}) | {r['trainer_step_ops']:.0f} | {phase} | {x['steps']} "
                             f"| {x['vsa_ops_median']:.0f} ({x['vsa_ops_median'] / r['trainer_step_ops']:.1%}) "
                             f"| {x['vsa_ops_max']} | {x['vsa_syncs_max']} |")
        if len(runs) >= 2:
            growth = [f"{ph} {runs[-1]['phases'][ph]['vsa_ops_median'] / max(1, runs[0]['phases'][ph]['vsa_ops_median']):.2f}x"
                      for ph in runs[0]["phases"] if ph in runs[-1]["phases"]]
            lines += ["", f"hf_vsa's ops from {runs[0]['layers']} to {runs[-1]['layers']} layers: " + ", ".join(growth)
                      + "."]
        lines.append("")
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "peak_memory*.json"))):
        data = json.load(open(path))
        runs, sets = {r["kind"]: r for r in data["runs"]}, data["args"].get("set") or []
        lines += [f"### `results/{os.path.basename(path)}`: " + ("defaults" if not sets else ", ".join(sets)), "",
                  f"Peak resident memory, each run in a process of its own, GPT-2 of {data['args']['layers']} layers "
                  f"({runs['trainer']['trainable'] / 1e6:.1f}M trainable parameters), {data['args']['steps']} steps "
                  f"(VSATrainer's phases: {', '.join(runs['vsa']['phases'])}): the Trainer "
                  f"{runs['trainer']['peak_rss'] / 2 ** 30:.2f} GiB, VSATrainer {runs['vsa']['peak_rss'] / 2 ** 30:.2f} "
                  f"GiB, {data['extra_bytes_per_parameter']:+.2f} bytes per trainable parameter. "
                  "(`python scripts/diagnostics/peak_memory.py" + "".join(f" --set {x}" for x in sets)
                  + f" --out results/{os.path.basename(path)}`"
                  + (f", on commit {data['hf_vsa_commit']}" if data.get("hf_vsa_commit") else "") + ")"
                  + (f" {data['what'][0].upper()}{data['what'][1:]}." if data.get("what") else ""), ""]
    return "\n".join(lines)
