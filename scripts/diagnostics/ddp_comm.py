"""Gradient traffic under DDP: plain Trainer vs VSATrainer, measured by a DDP comm hook.

Run it under accelerate (CPU: real DDP over gloo; GPU: NCCL):
    accelerate launch --multi_gpu --num_processes 2 scripts/diagnostics/ddp_comm.py --task sentiment --steps 30
Trains the plain Trainer and then VSATrainer on the same model, data and seed in the same launch;
rank 0 prints the gradient bytes all-reduced per optimizer step (DDP's hook, plus the exact-tensor
bucket hf_vsa averages itself on partial PREDICT steps) and their ratio. Each rank writes its
weights, VSA state, phases and per-step traffic under --out (the tests compare ranks with them).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/: benchmark, tasks

import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import Trainer, TrainerCallback

from hf_vsa import VSATrainer, VSATrainingArguments
from hf_vsa.checkpoint import save_engine
from tasks import sentiment_task, tiny_dataset, tiny_model

MODES = {
    "default": {},
    # gradient accumulation 2 with micro-batch gradients held in ternary between micro-batches
    "ternary_accumulation": dict(vsa_exact_fraction=0.3, vsa_min_cosine=0.0, gradient_accumulation_steps=2,
                                 vsa_ternary_accumulation=True, vsa_whole_step=False, vsa_block_drop=0.5,
                                 vsa_adaptive_block_drop=False),
    "no_backward": dict(vsa_exact_fraction=0.0, vsa_min_cosine=-1.0),
    # PREDICT steps: a backward that stops at the exact tensors
    "partial": dict(vsa_exact_fraction=0.3, vsa_min_cosine=0.0, vsa_block_drop=1.0, vsa_whole_step=False),
    # PREDICT steps: the same, plus the lower blocks that this step's DropBP draw keeps
    "dropbp": dict(vsa_exact_fraction=0.3, vsa_min_cosine=0.0, vsa_block_drop=0.5, vsa_whole_step=False,
                   vsa_adaptive_block_drop=False),
    # the defaults with gradient accumulation: the measured noise scale decides whole-step PREDICT (on
    # the tiny task with one label for every example: a gradient with a strong mean, predictions worth
    # ~0.85 of a backward, which 20% more steps admit; two CORRECT steps per PREDICT block)
    "whole_step": dict(gradient_accumulation_steps=2, vsa_tolerance=0.2, vsa_correct_every=2),
}


class CommCounter(TrainerCallback):
    """Counts DDP all-reduce calls and bytes per optimizer step through a comm hook."""

    def __init__(self, trainer):
        self.trainer, self.calls, self.bytes, self.per_step = trainer, 0, 0, []

    def hook(self, state, bucket):
        self.calls += 1
        self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    def on_train_begin(self, args, state, control, **kw):
        self.trainer.model_wrapped.register_comm_hook(None, self.hook)

    def on_step_end(self, args, state, control, **kw):
        vsa = getattr(self.trainer, "vsa", None)
        own = vsa.comm_bytes if vsa is not None else 0
        self.per_step.append([self.calls, self.bytes, own])
        self.calls = self.bytes = 0
        if vsa is not None:
            vsa.comm_bytes = 0


def run(a, vsa, out):
    if a.task == "tiny":
        model, train = tiny_model(), tiny_dataset(512)
        if a.mode == "whole_step":
            train = train.map(lambda row: {"labels": 1})
        sched = dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                     vsa_correct_every=3)
        sched.update({k: v for k, v in MODES[a.mode].items() if k in sched})
        batch, lr = 8, 1e-3
    else:
        model, _, train, _ = sentiment_task(max_length=32, n_eval=64)
        sched, batch, lr = {}, 16, 1e-4
    args = VSATrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=a.steps, per_device_train_batch_size=batch, learning_rate=lr,
        logging_steps=4, report_to="none", use_cpu=True, save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500, disable_tqdm=True, seed=0, vsa_enabled=vsa, **{**MODES[a.mode], **sched})
    trainer = (VSATrainer if vsa else Trainer)(model=model, args=args, train_dataset=train)
    counter = CommCounter(trainer)
    trainer.add_callback(counter)
    trainer.train(resume_from_checkpoint=a.resume if vsa else None)
    return model, trainer, counter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="tiny", choices=["tiny", "sentiment"])
    p.add_argument("--mode", default="default", choices=list(MODES))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--baseline", action="store_true", help="also run the plain Trainer first and compare")
    p.add_argument("--out", default="bench_out/ddp")
    a = p.parse_args(argv)
    base = run(a, False, os.path.join(a.out, "trainer"))[2] if a.baseline else None
    model, trainer, counter = run(a, True, a.out)
    rank = trainer.args.process_index
    rows = trainer.vsa_rank_rows()  # all ranks: the rank-local statistics, as a checkpoint holds them
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, f"weights{rank}.safetensors"))
    os.makedirs(os.path.join(a.out, f"vsa{rank}"), exist_ok=True)
    save_engine(trainer.vsa, os.path.join(a.out, f"vsa{rank}"), rows)
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.args.world_size, "phases": trainer.vsa.phases, "comm": counter.per_step,
                   "whole_steps": trainer.vsa.whole_steps,
                   "counts": trainer.vsa.controller.counts}, f)
    if rank == 0:
        per = lambda c: sum(b + o for _, b, o in c.per_step) / len(c.per_step)
        print(f"world size {trainer.args.world_size}; {len(counter.per_step)} optimizer steps")
        by = {}
        for ph, (calls, b, o) in zip(trainer.vsa.phases, counter.per_step):
            by.setdefault(ph, []).append(b + o)
        for ph, xs in by.items():
            print(f"  VSATrainer {ph:<8} {len(xs):>4} steps, {sum(xs) / len(xs) / 1e6:9.3f} MB all-reduced per step")
        if base is not None:
            print(f"gradient MB per optimizer step: Trainer {per(base) / 1e6:.3f}, VSATrainer {per(counter) / 1e6:.3f}, "
                  f"ratio {per(counter) / per(base):.3f}")
    # Tear the process group down before exit: left to interpreter shutdown, gloo's threads can
    # abort a rank ("terminate called without an active exception") after all the work is done.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
