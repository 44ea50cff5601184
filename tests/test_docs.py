"""The generated documentation is current, and the README is what a newcomer reads in five minutes."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs  # noqa: E402
import docs_cost  # noqa: E402


def test_generated_docs_are_current():
    # docs/arguments.md from the fields' help strings; docs/results.md and README's table from results/
    stale = [str(Path(p).relative_to(ROOT)) for p, text in docs.targets().items()
             if not Path(p).exists() or Path(p).read_text() != text]
    assert not stale, f"out of date: {stale}; run: python scripts/docs.py"


def test_every_vsa_argument_is_documented_with_its_help():
    from dataclasses import fields
    from hf_vsa import VSATrainingArguments
    text = (ROOT / "docs" / "arguments.md").read_text()
    for f in fields(VSATrainingArguments):
        if f.name.startswith("vsa_"):
            assert f"| `{f.name}` |" in text and f.metadata.get("help"), f.name


def test_readme_is_short_and_the_tree_holds_no_patch():
    readme = (ROOT / "README.md").read_bytes()
    assert readme.count(b"\n") <= 300 and len(readme) <= 25_000
    # the project's own files only: a virtual environment in the checkout (.venv) may hold packages' patches
    ours = [p for p in ROOT.rglob("*.patch") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert not ours


def test_readme_table_summarises_every_anchors_file_over_its_seeds():
    # the README's one table is the generator's, a row per run of each task's anchors file and of each
    # large-batch file, each figure the seeds' mean [min, max] of what the files hold
    table = docs.summary_table()
    assert table in (ROOT / "README.md").read_text()
    breadth = docs.summary_table(("sentiment", "gpt2_scratch"), large_batch=False)
    assert breadth in (ROOT / "docs" / "results.md").read_text()
    table += breadth
    for task in docs.SUMMARY_TASKS:
        data = {"seeds": docs_cost.task_seeds("anchors", task)}  # anchors_<task>.json and its later seeds' files
        if not data["seeds"]:
            continue
        for name in [r["name"] for r in data["seeds"][0]["summary"]["rows"]][1:]:
            row = next(line for line in table.splitlines() if line.startswith(f"| {task} | {docs.LABELS.get(name, name)} |"))
            walls = [next(r for r in s["summary"]["rows"] if r["name"] == name)["vs_trainer_at_same_wall"]
                     for s in data["seeds"]]
            # the cell is "mean [min, max]": the mean leads it (a bare `in` would also match the min or the max)
            assert row.split(" | ")[7].startswith(f"{sum(walls) / len(walls):+.1%}"), (name, row)


def test_regime_table_numbers_come_from_the_results_files(tmp_path):
    # the per-seed table of the default in each regime, in docs/results.md
    table = docs.regime_table()
    text = (ROOT / "docs" / "results.md").read_text()
    assert table in text
    for regime, _ in docs.REGIMES:
        for task in docs.TASKS:
            assert f"| {regime} | {task}" in table


def test_controls_table_numbers_come_from_the_results_files():
    # the prediction against the sceptic's controls, a row per task-seed, every task listed
    table = docs.controls_table()
    assert table in (ROOT / "docs" / "results.md").read_text()
    for task in docs.TASKS:
        assert f"| {task}" in table
    for name in docs.CONTROLS:
        assert f" {name} |" in table.splitlines()[0]


def test_phase_cost_table_times_each_phase_against_the_trainers_step_in_the_same_seed():
    # docs/results.md: per run with PREDICT steps, each phase's median step time over the Trainer's median step
    import statistics
    table = docs.phase_cost_table(docs.SUMMARY_TASKS)
    assert table in (ROOT / "docs" / "results.md").read_text()
    path = ROOT / "results" / "anchors_smollm_lora.json"
    seeds = json.loads(path.read_text())["seeds"]
    for name in ("predict_all", "coast"):
        ratios = []
        for s in seeds:
            run = next(r for r in s["runs"] if r["name"] == name)
            predict = [w for ph, w in zip(run["phase"], run["step_wall"]) if ph == "PREDICT"]
            ratios.append(statistics.median(predict) / statistics.median(s["runs"][0]["step_wall"]))
        row = next(line for line in table.splitlines() if line.startswith(f"| smollm_lora | {name} |"))
        assert row.split(" | ")[4].startswith(f"{sum(ratios) / len(ratios):.2f}x"), row
        assert ratios[0] < 0.1  # LoRA: a PREDICT step costs next to nothing
    assert "| smollm_lora | trainer |" not in table and "| smollm_lora | dropbp_published |" not in table


def test_every_local_link_and_picture_in_the_docs_exists():
    import re
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_tolerance_table_averages_each_tolerance_over_the_seeds(tmp_path):
    # A file that ran VSATrainer at two vsa_tolerance values (the default, {}; and 0.2) on two seeds,
    # summarized by the benchmark's own code: one row per tolerance, the seeds' mean.
    from benchmark import summarize

    def run(name, overrides, losses, wall_per_step):
        evals = [{"step": 2 * i, "wall": 2 * i * wall_per_step, "eval_loss": x} for i, x in enumerate(losses)]
        return {"name": name, "overrides": overrides, "step_wall": [wall_per_step] * 2 * (len(losses) - 1),
                "evals": evals, "train_wall": evals[-1]["wall"], "final_eval_loss": losses[-1],
                "examples_per_step": 8, "backward_fraction": 1.0, "peak_rss_bytes": None,
                "cuda_max_allocated_bytes": None}
    seeds = []
    for seed, slower in ((0, 1.0), (1, 2.0)):
        runs = [run("trainer", None, [2.0, 1.5, 1.2, 1.0], 1.0),
                run("default", {}, [2.0, 1.4, 1.1, 1.0], 0.5 * slower),
                run("loose", {"vsa_tolerance": 0.2}, [2.0, 1.6, 1.3, 1.1], 0.25)]
        seeds.append({"seed": seed, "summary": summarize(runs), "runs": runs})
    path = tmp_path / "large_batch_x.json"
    path.write_text(json.dumps({"task": "x", "seeds": seeds}))
    table = docs.tolerance_table(str(path))
    rows = [line for line in table.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 2 and rows[0].startswith("| 0.05 (default) |") and rows[1].startswith("| 0.2 |")
    # the default: per step 2x on seed 0 and 1x on seed 1 (mean 1.50x); the Trainer's 1.0 reached at
    # step 6 (the Trainer's steps: 1.00x), 3 s and 6 s of the Trainer's 6 s (mean 0.75x); the loose run never reaches it
    assert "| 1.50x | 0.75x | 1.00x |" in rows[0] and "| 4.00x | not reached | - |" in rows[1]
    assert "| +10.0% |" in rows[1]  # final evaluation at equal steps, 1.1 against 1.0
    # a file with one tolerance gets no such table
    seeds[0]["runs"] = seeds[0]["runs"][:2]
    seeds[1]["runs"] = seeds[1]["runs"][:2]
    path.write_text(json.dumps({"task": "x", "seeds": seeds}))
    assert docs.tolerance_table(str(path)) is None
