"""Measure the prediction on a sample of the model before paying for it in full.

Keeping a compressed history of every tensor costs memory and tens of ops per tensor per step; the
measurements in results/ say the prediction rarely earns it (0 whole-step PREDICT steps in every
default run, 0-4% of tensors still tracked at the end). So the predictor first runs on a fixed
sample of the whole model: per tensor, a few contiguous windows (flat.Windows, `vsa_probe_fraction`
of its elements and at least MIN_ELEMENTS, the whole tensor where it has no more), gathered from
every gradient as one cat of views and tracked as ONE flat tensor. Recording and comparing it are a
few ops whatever the number of tensors, and its history costs about vsa_probe_fraction times that
of the full one. Each sampled element is scaled by sqrt(numel / sampled) of its tensor, so inner
products over the sample estimate the whole model's, where a weight matrix outweighs a bias.

At CORRECT steps the engine measures on the sample whether the prediction beats the zero gradient
(the optimizer coasting on its momentum) as an estimate of the step's gradient, and gives the
tensors a full history (tracking.Tracker.promote) only once that is measurably so; until then PREDICT
steps give the predicted tensors no update. The windows follow from the seed alone: nothing to save.
Each tensor's windows are padded to whole compression blocks (`align`), so the AR fit is one per tensor
on the sample as it is on the full history.
"""
from .flat import Windows

# A tensor of at most this many elements is sampled whole: the cosine of two unrelated 4096-element
# vectors has a standard deviation of 1/64 (0.016), well below the gate's 0.2.
MIN_ELEMENTS = 4096


def probe_windows(params, fraction, seed, align=1):
    """The probe's sample of `params` (flat.Windows)."""
    return Windows(params, MIN_ELEMENTS, seed, 4, fraction=fraction, align=align)
