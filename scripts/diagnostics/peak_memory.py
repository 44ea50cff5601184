"""Peak resident memory of a training run, the plain Trainer against VSATrainer's defaults, each in a
process of its own (VmHWM from /proc/self/status), on a 12-layer GPT-2 built from a config.

usage:
    python scripts/diagnostics/peak_memory.py --out results/peak_memory.json
    python scripts/diagnostics/peak_memory.py --layers 2 --steps 24          # quick
    python scripts/diagnostics/peak_memory.py --set vsa_probe_fraction=0.0   # any VSATrainingArguments field

The engine issue's bar: VSATrainer's peak at most 2 bytes per trainable parameter above the Trainer's,
CORRECT steps included (the default schedule reaches its first CORRECT step by step 20).
"""
import argparse
import json
import os
import subprocess
import sys


def child(kind, layers, steps, vocab, sets):
    import tempfile

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from hf_vsa import VSATrainer, VSATrainingArguments
    from hf_vsa.counting import peak_rss_bytes
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tasks import _lm_blocks
    from benchmark import parse_value
    extra = {k: parse_value(v) for k, v in (x.split("=", 1) for x in sets)}
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_layer=layers))
    ids = torch.randint(0, vocab, (256 * 32,), generator=torch.Generator().manual_seed(0)).tolist()
    train = _lm_blocks(ids, 32, 4)[0]
    with tempfile.TemporaryDirectory() as d:
        kw = dict(output_dir=d, max_steps=steps, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                  learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True,
                  disable_tqdm=True, seed=0)
        if kind == "trainer":
            t = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=train)
        else:
            t = VSATrainer(model=model, args=VSATrainingArguments(**kw, **extra), train_dataset=train)
        t.train()
        phases = sorted(set(t.vsa.phases)) if kind != "trainer" else []
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"kind": kind, "peak_rss": peak_rss_bytes(), "trainable": n, "phases": phases}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--out")
    p.add_argument("--child")
    p.add_argument("--set", action="append", default=[], help="a VSATrainingArguments field=value")
    a = p.parse_args()
    if a.child:
        return child(a.child, a.layers, a.steps, a.vocab, a.set)
    rows = []
    for kind in ("trainer", "vsa"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--layers", str(a.layers), "--steps",
                              str(a.steps), "--vocab", str(a.vocab)] + [f"--set={x}" for x in a.set],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base, vsa = rows
    extra = (vsa["peak_rss"] - base["peak_rss"]) / base["trainable"]
    print(f"{a.layers} layers, {base['trainable'] / 1e6:.1f}M trainable: Trainer {base['peak_rss'] / 2**30:.2f} GiB, "
          f"VSATrainer {vsa['peak_rss'] / 2**30:.2f} GiB ({', '.join(vsa['phases'])}): "
          f"{extra:+.2f} bytes per trainable parameter")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "runs": rows, "extra_bytes_per_parameter": extra}, f, indent=1)


if __name__ == "__main__":
    main()
