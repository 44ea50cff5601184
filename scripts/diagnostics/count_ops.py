"""What hf_vsa adds to a training step, counted, not timed: aten ops (GPU kernel launches) and host
syncs per optimizer step by phase, against the plain Trainer's own step, at two model depths.

usage:
    python scripts/diagnostics/count_ops.py                       # GPT-2 from config, 4 and 8 layers
    python scripts/diagnostics/count_ops.py --layers 2,4 --out results/op_counts.json
    python scripts/diagnostics/count_ops.py --set vsa_whole_step=False   # any VSATrainingArguments field

The ops are split by owner with hf_vsa.counting.OpCounter (hf_vsa's when hf_vsa's code dispatched
them, its tensor hooks included); the Trainer's step is the median over a plain Trainer run's steps.
The bar of the engine issue: hf_vsa's ops on a FULL step at most 25% of the Trainer's step, growing
at most 1.2x when the depth doubles; 0 hf_vsa syncs on WARMUP, FULL and PREDICT steps.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_vsa import VSATrainer, VSATrainingArguments
from hf_vsa.counting import count_training
from benchmark import parse_value
from tasks import _lm_blocks


def data(n=2048, block=32):
    ids = torch.randint(0, 256, (n * block,), generator=torch.Generator().manual_seed(0)).tolist()
    return _lm_blocks(ids, block, 8)[0]


def model(layers, width=64):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=width, n_layer=layers, n_head=2))


def run(layers, steps, accum, extra, out_dir):
    common = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=accum,
                  learning_rate=1e-3, logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True,
                  disable_tqdm=True, seed=0)
    plain = count_training(Trainer(model=model(layers), args=TrainingArguments(**common), train_dataset=data()))
    trainer_ops = statistics.median(r[1] + r[2] for r in plain[1:])
    t = VSATrainer(model=model(layers), args=VSATrainingArguments(**common, **extra), train_dataset=data())
    rows = count_training(t)
    by_phase = {}
    for phase, vsa_ops, _, vsa_syncs, _ in rows[1:]:  # (the first step also builds the engine)
        by_phase.setdefault(phase, []).append((vsa_ops, vsa_syncs))
    out = {"layers": layers, "tensors": len(t.vsa.params), "trainer_step_ops": trainer_ops,
           "trainer_syncs_per_step": statistics.median(r[3] + r[4] for r in plain[1:]), "phases": {}}
    for phase, xs in by_phase.items():
        out["phases"][phase] = {"steps": len(xs), "vsa_ops_median": statistics.median(x[0] for x in xs),
                                "vsa_ops_max": max(x[0] for x in xs), "vsa_syncs_max": max(x[1] for x in xs),
                                "vsa_syncs_total": sum(x[1] for x in xs)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,8")
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="a VSATrainingArguments field=value")
    p.add_argument("--out")
    a = p.parse_args()
    extra = {k: parse_value(v) for k, v in (s.split("=", 1) for s in a.set)}
    import tempfile
    results = []
    with tempfile.TemporaryDirectory() as d:
        for n in [int(x) for x in a.layers.split(",")]:
            r = run(n, a.steps, a.grad_accum, extra, d)
            results.append(r)
            print(f"{n} layers, {r['tensors']} tensors: Trainer step {r['trainer_step_ops']:.0f} ops, "
                  f"{r['trainer_syncs_per_step']:.0f} syncs")
            for phase, s in r["phases"].items():
                print(f"  {phase:8s} {s['steps']:3d} steps: hf_vsa ops median {s['vsa_ops_median']:.0f} "
                      f"({s['vsa_ops_median'] / r['trainer_step_ops']:.1%} of the Trainer's step), max {s['vsa_ops_max']}; "
                      f"hf_vsa syncs max {s['vsa_syncs_max']}, total {s['vsa_syncs_total']}")
    if len(results) >= 2:
        for phase in results[0]["phases"]:
            if phase in results[-1]["phases"]:
                a0 = results[0]["phases"][phase]["vsa_ops_median"]
                a1 = results[-1]["phases"][phase]["vsa_ops_median"]
                print(f"{phase}: hf_vsa ops grow {a1 / max(a0, 1):.2f}x from {results[0]['layers']} to "
                      f"{results[-1]['layers']} layers")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "torch": torch.__version__, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
