"""Plots from a benchmark JSON: eval loss vs wall time and vs step for each run (phases of the
VSA run shaded), and per-step wall time by phase. Needs matplotlib.

usage: python scripts/plot_benchmark.py bench_out/sentiment.json [--seed 0] [--out bench_out/sentiment.png]
"""
import argparse
import json

COLORS = {"WARMUP": "#dddddd", "FULL": "#c6dbef", "PREDICT": "#fdd0a2", "CORRECT": "#c7e9c0"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json")
    p.add_argument("--seed", type=int, default=None, help="which seed's runs (default: the first)")
    p.add_argument("--shade", default="default", help="run whose phases are shaded")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(a.json))
    block = data["seeds"][0] if a.seed is None else next(s for s in data["seeds"] if s["seed"] == a.seed)
    runs = block["runs"]
    fig, (ax_t, ax_s, ax_p) = plt.subplots(1, 3, figsize=(17, 4.6))
    for r in runs:
        ev = r["evals"]
        ax_t.plot([e["wall"] for e in ev], [e["eval_loss"] for e in ev], marker=".", label=r["name"])
        ax_s.plot([e["step"] for e in ev], [e["eval_loss"] for e in ev], marker=".", label=r["name"])
    shade = next((r for r in runs if r["name"] == a.shade), None)
    if shade:
        for i, ph in enumerate(shade["phase"]):
            ax_s.axvspan(i, i + 1, color=COLORS.get(ph, "white"), alpha=0.5, lw=0)
        names = [r["name"] for r in runs]
        for ph, col in COLORS.items():
            xs = [i for i, q in enumerate(shade["phase"]) if q == ph]
            ax_p.scatter(xs, [shade["step_wall"][i] for i in xs], s=8, color=col, edgecolor="k", lw=0.2, label=ph)
        base = runs[0]
        ax_p.plot(range(len(base["step_wall"])), base["step_wall"], lw=0.6, color="k", label=f"{names[0]} (every step)")
    target = block["summary"]["target_eval_loss"]
    for ax in (ax_t, ax_s):
        ax.axhline(target, ls="--", lw=0.8, color="k")
        ax.set_ylabel("eval loss")
        ax.legend(fontsize=8)
    ax_t.set_xlabel("training wall time (s, evaluation excluded)")
    ax_s.set_xlabel(f"optimizer step (shaded: phases of '{a.shade}')")
    ax_p.set_xlabel("optimizer step")
    ax_p.set_ylabel("wall time per step (s)")
    ax_p.legend(fontsize=8)
    fig.suptitle(f"{data['task']} (seed {block['seed']}) on {data['device']}; dashed: Trainer's final eval loss")
    fig.tight_layout()
    out = a.out or a.json.replace(".json", ".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
