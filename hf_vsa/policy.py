"""The decision rules, pure functions of measured values: whether whole-step PREDICT pays, how many
micro-batches a step needs, how often a block skips its backward. The first two read vsa_tolerance,
the extra optimizer steps (a fraction) a skip may cost by the steps-vs-batch law (McCandlish et al.
2018); every caller passes host values or device tensors already posted, so no rule syncs the host."""
import math

import torch

WORTH_WINDOW = 8  # the whole-step test reads the admitted predictions' worth at the last 8 CORRECT steps


def lower_bound(values):
    """Mean less two standard errors of `values` (host floats): a one-sided ~97.5% lower confidence
    bound on their expectation; NaN with fewer than two (no spread measured)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean - 2.0 * math.sqrt(var / n)


def admitted(mask, dots, a2, p2):
    """(cosine, energy, worth) of the predictions the gate admits (`mask`, per tensor), from one CORRECT
    step's per-tensor <g, p>, |g|^2 and |p|^2 (host lists; NaN where a tensor is not tracked): their
    cosine with the actual gradient, their share of its energy, and worth = energy * cosine (0 when
    nothing is admitted), what whole_step_pays reads."""
    ok = lambda x: x == x  # noqa: E731 (not NaN)
    adm = [i for i, keep in enumerate(mask) if keep and ok(dots[i])]
    total = sum(x for x in a2 if ok(x))
    d, a, p = (sum(x[i] for i in adm) for x in (dots, a2, p2))
    cosine = d / math.sqrt(a * p) if a > 0 and p > 0 else math.nan
    energy = a / total if total > 0 else 0.0
    return cosine, energy, energy * cosine if adm else 0.0


def whole_step_pays(worth, kappa: float, predict_share: float, tolerance: float) -> bool:
    """Whether PREDICT steps may skip everything (forward, every backward, the all-reduce), from what
    was measured. `worth`: at recent CORRECT steps, energy * cosine of the predictions the gate admits
    (they carry `energy` of the gradient's energy, the others get no update, and `cosine` is their
    cosine with the actual minibatch gradient). Their alignment with the mean gradient is then
    cosine / sqrt(kappa), against sqrt(kappa) for a backward (noise.py), so a whole-step PREDICT step is
    worth v = worth / kappa of a backprop step. A single CORRECT step measures worth with much noise
    (at small batch its sign flips from one to the next), so the test takes a lower confidence bound
    of it over the recent ones (lower_bound), not the last. With a share p of the steps predicted,
    the optimizer needs 1 / (1 - p (1 - v)) times the steps to a given loss: allowed while that is at
    most 1 + tolerance, i.e. v >= 1 - tolerance / ((1 + tolerance) p). kappa = 0 (no mean measured:
    the estimates are clamped there), no predicted steps, or fewer than two measurements say no."""
    bound = lower_bound([w for w in worth if w == w])
    if not (kappa > 0 and predict_share > 0 and bound == bound):
        return False
    return bound / kappa >= 1 - tolerance / ((1 + tolerance) * predict_share)


def micro_batches_needed(noise, full, fewest, tolerance):
    """Adaptive accumulation: the fewest micro-batches m in [fewest, full] whose expected optimizer
    steps to a given loss exceed those of all `full` by at most `tolerance` (a fraction), by the
    steps-vs-batch law S(B) = S_min (1 + B_noise / B) (McCandlish et al. 2018, eq. 2.11); `noise`:
    B_noise in micro-batches (over all ranks). NaN (not measured) or inf: all of them."""
    if not noise == noise or noise == float("inf"):
        return full
    allowed = (1 + tolerance) * (1 + noise / full) - 1  # largest B_noise / B with at most that many more steps
    return max(fewest, min(full, math.ceil(noise / allowed - 1e-9))) if noise > 0 else fewest


# Per parameter and token a forward costs about 2 FLOPs and a backward about 4 (Kaplan et al. 2020,
# "Scaling Laws for Neural Language Models", C = 6N): skipping a block's backward saves 2/3 of what
# the block costs a step, and a step's cost is shared by its tensors in proportion to their size.
BACKWARD_SHARE = 2.0 / 3.0


def drop_probabilities(kappa, base: float, sizes):
    """Per droppable block, the probability its backward is skipped on a partial PREDICT step.

    `kappa`: per group the measured mean share of its gradient (noise.py; or the lag-1 gradient
    cosine, whose expectation it is), the droppable blocks first, then the group of tensors every
    partial step computes; `sizes`: their numbers of elements. a = sqrt(kappa), clamped to [0, 1], is
    the cosine between the mean gradient and one minibatch gradient: the share of an update that is
    signal. Under Adam each parameter moves about as far every step, so a group's progress in a step
    is about size * a, and skipping block k's backward loses size_k * a_k of it while saving
    BACKWARD_SHARE * size_k of the step's cost. That raises the progress per unit of cost only where
    a_k < BACKWARD_SHARE * (the size-weighted mean of a over all groups): such a block is skipped
    with probability base * (1 - a_k) (noisier blocks more often), any other never. Where every
    group's gradient carries about the same signal, no block is skipped and a partial step would
    cost more progress than time: the engine then runs the step's full backward instead."""
    a = kappa.double().clamp(0.0, 1.0).sqrt()
    sizes = torch.as_tensor(sizes, dtype=a.dtype, device=a.device)
    mean = (a * sizes).sum() / sizes.sum().clamp_min(1.0)
    blocks = a[:-1]
    return torch.where(blocks < BACKWARD_SHARE * mean, base * (1.0 - blocks), torch.zeros_like(blocks))
