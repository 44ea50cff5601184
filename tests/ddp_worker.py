"""Worker for tests/test_distributed.py, started by `accelerate launch --multi_gpu --num_processes 2`
with use_cpu=True (real DDP over gloo). Writes, per rank, the weights, the VSA state, the phases
and the all-reduce calls/bytes that DDP's comm hook saw at each optimizer step.

usage: accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py OUT MODE [RESUME_FROM]
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_dataset, make_model  # noqa: E402
from hf_vsa import VSATrainer, VSATrainingArguments  # noqa: E402
from hf_vsa.checkpoint import save_engine  # noqa: E402

MODES = {
    "no_backward": dict(vsa_exact_fraction=0.0, vsa_min_cosine=-1.0),
    "partial": dict(vsa_exact_fraction=0.3, vsa_min_cosine=0.0),
}


class CommCounter(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.calls, self.bytes, self.per_step = trainer, 0, 0, []

    def hook(self, state, bucket):
        self.calls += 1
        self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    def on_train_begin(self, args, state, control, **kw):
        self.trainer.model_wrapped.register_comm_hook(None, self.hook)

    def on_step_end(self, args, state, control, **kw):
        self.per_step.append([self.calls, self.bytes, self.trainer.vsa.comm_bytes])
        self.calls = self.bytes = 0
        self.trainer.vsa.comm_bytes = 0


def main(out, mode, resume=None):
    args = VSATrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=16, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=4, report_to="none", use_cpu=True, save_strategy="steps", save_steps=4, disable_tqdm=True,
        seed=0, vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
        vsa_correct_every=3, **MODES[mode])
    model = make_model()
    trainer = VSATrainer(model=model, args=args, train_dataset=make_dataset(512))
    counter = CommCounter(trainer)
    trainer.add_callback(counter)
    trainer.train(resume_from_checkpoint=resume)
    rank = trainer.args.process_index
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"weights{rank}.safetensors"))
    os.makedirs(os.path.join(out, f"vsa{rank}"), exist_ok=True)
    save_engine(trainer.vsa, os.path.join(out, f"vsa{rank}"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.args.world_size, "phases": trainer.vsa.phases, "comm": counter.per_step,
                   "counts": trainer.vsa.controller.counts}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
