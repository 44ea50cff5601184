"""The hf_vsa section of the model card: the Trainer's own card, plus tags and run statistics."""
import os
from dataclasses import fields
from importlib import resources
from importlib.metadata import PackageNotFoundError, version

import jinja2
from huggingface_hub import ModelCard

TAGS = ("hf_vsa", "vsa-trainer")
SECTION = "## Trained with hf_vsa"


def _versions():
    out = {}
    for pkg in ("hf_vsa", "torch", "transformers", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def render_section(engine, args, plot=None) -> str:
    stats = engine.stats()
    template = resources.files("hf_vsa.model_cards").joinpath("vsa_section.md.j2").read_text()
    how = (f"computed exactly for the top {args.vsa_exact_fraction:.0%} of trainable tensors by a partial "
           "backward and predicted for the others" if engine.exact else "predicted in closed form")
    if engine.exact and args.vsa_block_drop == 0:
        how = ("not used on partial steps: with vsa_block_drop=0 the PREDICT steps that were not whole ran full "
               "backprop")
    elif engine.blocks:
        if args.vsa_adaptive_block_drop:
            p = (f"probability {args.vsa_block_drop:g} x (1 - sqrt of its gradient's measured signal share) "
                 "where that signal per unit of backward cost was below the step's, else never; where no block "
                 f"qualified, PREDICT steps ran full backprop (last: {', '.join(f'{d:.2f}' for d in engine.drop)})")
        else:
            p = f"probability {args.vsa_block_drop:g}"
        how += (f"; each of the {len(engine.blocks)} transformer blocks below them skipped its backward with "
                f"{p} (DropBP) and computed its tensors' exact gradient otherwise")
    if engine.whole_steps:
        how += ("; where the measured noise scale and prediction quality said it pays, whole-step PREDICT "
                "ran no forward and no backward at all")
    cosine = stats["vsa/prediction_cosine_mean"]
    b_noise, ratio = stats["vsa/noise_scale"], stats["vsa/batch_over_noise_scale"]
    noise = ("not measured" if b_noise != b_noise else
             f"{b_noise:.3g} examples (the batch is {ratio:.3g}x it)")
    return jinja2.Template(template, keep_trailing_newline=True).render(
        steps=engine.controller.step, counts=engine.controller.counts, seconds=engine.seconds,
        total_seconds=sum(engine.seconds.values()), backward_fraction=stats["vsa/backward_fraction"],
        speedup=stats["vsa/speedup_estimate"], cosine="n/a" if cosine != cosine else f"{cosine:.3f}",
        memory_ratio=stats["vsa/state_memory_ratio"],
        memory_peak=stats["vsa/state_memory_peak_ratio"], predict_how=how, plot=plot,
        whole_steps=len(engine.whole_steps), noise=noise, micro_fraction=stats.get("vsa/micro_batch_fraction"),
        config={f.name: getattr(args, f.name) for f in fields(args) if f.name.startswith("vsa_")},
        versions=_versions())


def add_vsa_section(path, engine, args, plot=None):
    """Add the tags and (re)place the hf_vsa section in the card at `path`."""
    card = ModelCard.load(path)
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in TAGS if t not in tags]
    text = card.text.split(SECTION)[0].rstrip() + "\n\n"
    card.text = text + render_section(engine, args, plot)
    card.save(path)
    return path
