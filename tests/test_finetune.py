"""The main job end to end on the real pretrained MiniLM-L6 and the real movie-review data."""
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run(tmp_path, *extra):
    cmd = [sys.executable, str(SCRIPTS / "finetune.py"), "--output_dir", str(tmp_path), "--max_steps", "14",
           "--per_device_train_batch_size", "8", "--n_eval", "32", "--eval_steps", "7", "--max_length", "24",
           "--vsa_warmup_steps", "3", "--vsa_history_window", "3", "--vsa_full_steps", "2", "--vsa_predict_steps",
           "4", "--vsa_correct_every", "2", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_main_job_with_the_defaults_runs_every_backward_and_measures(tmp_path):
    out = run(tmp_path)
    assert "full backward passes   14" in out and "optimizer steps        14" in out
    assert "PREDICT steps          0 (the PREDICT blocks ran backprop: nothing measured to pay)" in out
    assert "final eval accuracy" in out and (tmp_path / "model.safetensors").exists()


def test_main_job_fine_tunes_the_real_model_and_prints_a_summary(tmp_path):
    out = run(tmp_path, "--vsa_block_drop", "0.5")
    assert "== VSATrainer summary ==" in out
    assert "optimizer steps        14" in out
    assert "full backward passes   9" in out  # WWW FF PCPP FF PCP
    line = next(line for line in out.splitlines() if line.startswith("PREDICT steps"))
    head = ("PREDICT steps          5 (forward + backward through the top 20% of trainable tensors and, below them, "
            "each of 4 blocks with probability 1 - 0.5 x (1 - sqrt of its measured gradient signal share) where "
            "that signal per unit of backward cost is below the step's, else 1; last: ")
    assert line.startswith(head) and line.endswith(" (DropBP))")  # MiniLM's layers 0-3
    keep = [float(k) for k in line[len(head):-len(" (DropBP))")].split(", ")]
    assert len(keep) == 4 and all(0.5 <= k <= 1.0 for k in keep)
    assert "final eval accuracy" in out
    memory = next(line for line in out.splitlines() if line.startswith("VSA state memory"))
    assert float(memory.split()[3].rstrip("x")) < 1.5 and "vsa_compression=int4" in memory  # 1.41x per predicted element
    assert (tmp_path / "model.safetensors").exists()


def test_baseline_flag_runs_the_plain_trainer(tmp_path):
    out = run(tmp_path, "--baseline")
    assert "== Trainer summary ==" in out and "full backward passes   14" in out


def test_dataset_flag_takes_the_other_rated_snippet_sets_offline(tmp_path):
    out = run(tmp_path, "--baseline", "--dataset", "tweets")
    assert "data                   tweets: 4168 training, 32 held-out examples" in out  # 4,200 tweets
    assert "final eval accuracy" in out


def test_compare_runs_both_and_prints_their_ratios(tmp_path):
    out = run(tmp_path, "--compare")
    assert "== Trainer summary ==" in out and "== VSATrainer summary ==" in out
    side = out.split("== VSATrainer against the Trainer")[1]
    for label in ("wall time per step", "training wall time", "final eval loss", "final eval accuracy"):
        assert label in side
    per_step = next(line for line in side.splitlines() if line.startswith("wall time per step"))
    assert float(per_step.split()[4].rstrip("x")) > 0
    assert "speedup estimate" in out
    assert (tmp_path / "trainer" / "model.safetensors").exists() and (tmp_path / "model.safetensors").exists()
