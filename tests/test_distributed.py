"""Real 2-process DDP (accelerate launch --multi_gpu, gloo on CPU) with a tiny real model."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "diagnostics" / "ddp_comm.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, mode, resume=None, steps=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(SCRIPT), "--task", "tiny", "--mode", mode, "--out", str(out),
           "--save_steps", "4"] + (["--resume", str(resume)] if resume else []) + (["--steps", str(steps)] if steps else [])
    done = run_launch(cmd)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def run_launch(cmd):
    """A 2-process launch. A hang must fail the test, not block CI. Retried (3 tries in all) only for a
    known gloo abort of a rank at exit ("terminate called without an active exception", seen in 2 of
    about 10 DDP runs on 2 cores, 3 of 6 of the FSDP launch below); the run is deterministic, so a
    retry checks the same thing. Any other failure fails at once."""
    for attempt in range(3):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr:
            break
    return done


def same_files(out, name):
    a, b = load_file(str(out / name.format(0))), load_file(str(out / name.format(1)))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a


@pytest.mark.parametrize("mode", ["no_backward", "partial", "dropbp", "ternary_accumulation", "whole_step"])
def test_ranks_stay_identical_and_predict_steps_skip_ddp_all_reduce(tmp_path, mode):
    # ternary_accumulation: each rank holds its own micro-batch codes; they must be back in .grad
    # before DDP averages it, or the ranks' weights would part.
    # whole_step: the defaults with gradient accumulation 2; the measured noise scale (its
    # micro-batch norms averaged over the ranks) decides whole-step PREDICT the same on both ranks.
    r0, r1 = launch(tmp_path, mode, steps=30 if mode == "whole_step" else None)
    assert r0["world"] == 2
    assert r0["phases"] == r1["phases"] and "PREDICT" in r0["phases"]
    assert r0["whole_steps"] == r1["whole_steps"]
    assert bool(r0["whole_steps"]) == (mode == "whole_step")  # (partial modes: vsa_whole_step=False)
    same_files(tmp_path, "weights{}.safetensors")
    same_files(tmp_path, "vsa{}/vsa_state.safetensors")
    for step, (phase, (calls, nbytes, own)) in enumerate(zip(r0["phases"], r0["comm"])):
        if phase == "PREDICT":
            assert calls == 0  # DDP's reducer is never used on a PREDICT step
            # no_backward and whole-step PREDICT: no collective at all; partial: one bucket with the
            # exact tensors only (dropbp: and the kept blocks' tensors; every rank draws the same blocks)
            assert (own == 0) if mode == "no_backward" or step in r0["whole_steps"] else (0 < own)
        else:
            assert calls > 0 and own == 0
    full = max(n for p, (c, n, o) in zip(r0["phases"], r0["comm"]) if p != "PREDICT")
    if mode == "partial":
        assert all(o < full / 2 for p, (c, n, o) in zip(r0["phases"], r0["comm"]) if p == "PREDICT")


def test_resume_under_ddp_equals_the_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    launch(straight, "partial")
    resumed = tmp_path / "resumed"
    r0, r1 = launch(resumed, "partial", resume=straight / "run" / "checkpoint-8")
    assert r0["phases"] == r1["phases"] == json.loads((straight / "rank0.json").read_text())["phases"][8:]
    a = load_file(str(straight / "weights0.safetensors"))
    b = same_files(resumed, "weights{}.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    from conftest import make_dataset, make_model
    from hf_vsa import VSATrainer, VSATrainingArguments
    straight = tmp_path / "straight"
    r0, _ = launch(straight, "partial")
    args = VSATrainingArguments(output_dir=str(tmp_path / "one"), max_steps=16, per_device_train_batch_size=8,
                                learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                                disable_tqdm=True, seed=0, vsa_warmup_steps=3, vsa_history_window=3,
                                vsa_full_steps=2, vsa_predict_steps=6, vsa_correct_every=3,
                                vsa_exact_fraction=0.3, vsa_min_cosine=0.0, vsa_block_drop=1.0)
    t = VSATrainer(model=make_model(), args=args, train_dataset=make_dataset(512))
    t.train(resume_from_checkpoint=str(straight / "run" / "checkpoint-8"))
    # The schedule state carries over whatever the world size (the data split itself changes).
    assert t.vsa.phases[:4] == r0["phases"][8:12]
    assert t.vsa.controller.step == 16


FSDP_SCRIPT = '''
import sys
sys.path.insert(0, {scripts!r})
from tasks import tiny_dataset, tiny_model
from hf_vsa import VSATrainer, VSATrainingArguments

args = VSATrainingArguments(output_dir={out!r}, max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                            report_to="none", save_strategy="no", disable_tqdm=True, vsa_enabled=False)
trainer = VSATrainer(model=tiny_model(), args=args, train_dataset=tiny_dataset(64))
trainer.train()
if trainer.accelerator.is_main_process:  # (one line: two ranks' prints interleave)
    print("distributed:", trainer.accelerator.distributed_type.name, "fsdp:", trainer.is_fsdp_enabled,
          "wrapped:", type(trainer.model_wrapped).__name__, flush=True)
trainer.accelerator.end_training()
'''


def test_fsdp_cannot_run_on_cpu_through_accelerate(tmp_path):
    # Why FSDP is refused and not tested here: accelerate sets FSDP up only for accelerator devices
    # (MULTI_GPU, XPU, NPU, ...); a 2-process CPU launch asking for it (accelerate launch --use_fsdp
    # --fsdp_version 2) silently trains with DDP instead. If a version of accelerate ever runs FSDP on CPU,
    # this fails: then FSDP can be tested here, and VSATrainer refuses it (the test below) until supported.
    script = tmp_path / "fsdp_run.py"
    script.write_text(FSDP_SCRIPT.format(scripts=str(SCRIPT.parents[1]), out=str(tmp_path / "run")))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script)]
    done = run_launch(cmd)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "distributed: MULTI_CPU fsdp: False wrapped: DistributedDataParallel" in done.stdout, done.stdout[-2000:]


def test_fsdp_from_the_accelerate_configuration_is_refused(tmp_path, monkeypatch):
    # `accelerate launch --use_fsdp` (on GPUs) sets FSDP up without TrainingArguments.fsdp, which the
    # arguments' check never sees; the trainer reads what the Trainer found (is_fsdp_enabled). CPU
    # accelerate never reports FSDP (above), so here the Trainer's own finding is made to say so.
    from transformers import Trainer
    from conftest import make_dataset, make_model
    from hf_vsa import VSATrainer, VSATrainingArguments
    setup = Trainer.create_accelerator_and_postprocess

    def with_fsdp(self):
        setup(self)
        self.is_fsdp_enabled = True
    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", with_fsdp)
    args = VSATrainingArguments(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"FSDP \(from the accelerate configuration.*supported: single process and DDP"):
        VSATrainer(model=make_model(), args=args, train_dataset=make_dataset(16))
    off = VSATrainingArguments(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to="none", vsa_enabled=False)
    VSATrainer(model=make_model(), args=off, train_dataset=make_dataset(16))  # switched off: the Trainer's business
