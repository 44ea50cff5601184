"""VSA state on disk: one safetensors file per checkpoint, written atomically.

Tensors carry the tracker's flat history and per-tensor running means (tracker/, indexed as the
trainable parameters, whose names are saved with them), the noise and DropBP state; the safetensors
metadata carries the controller's integers/floats as JSON and the settings the state depends on.
"""
import json
import logging
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .controller import Phase

logger = logging.getLogger(__name__)

STATE_FILE = "vsa_state.safetensors"
# Bumped whenever saved state would be read differently (2: VSA keys made from random bytes;
# predictor `active` tensors; 3: the gate's per-tensor streaks, for retirement; 4: buffers allocated at
# the first record, and the peak state ratio; 5: the residual stored in 4 bits, not ternary; 6: the
# predictor may hold a probe's samples, not whole tensors; 7: the probe's sample, drawn from the first gradient;
# 8: the blocks' gradient consistency and drop probabilities; 9: every trainable tensor tracked (the
# exact ones too, for whole-step PREDICT), the AR fit's settings, the noise scale and the whole-step decision;
# 10: the exact tensors' consistency after the blocks', and the admitted predictions' recent worth;
# 11: the probe is one flat sample of fixed windows (nothing drawn to save), the values posted for the
# next decisions (mirror/, cycle_mirror/), the probe's measured gains, non-finite records as a tensor;
# 12: one flat history over the tracked tensors (tracker/), the prediction's state apart from the engine's).
STATE_VERSION = 12
# Settings whose change makes saved state meaningless.
STATE_SETTINGS = ("vsa_predictor", "vsa_history_decay", "vsa_residual_decay", "vsa_momentum", "vsa_compression",
                  "vsa_history_window", "vsa_compression_block", "vsa_ternary_rounding", "vsa_bundle_size",
                  "vsa_probe_fraction", "vsa_ar_order", "vsa_ar_ridge")
_ENGINE_INTS = ("step", "cycle_n", "log_n")
# Measured-loss sums and the micro-batch gradient norms differ by rank (each rank sees its own data):
# saved as one row per rank (float64, so that float32 values round-trip exactly).
RANK_LOCAL = ("cycle_loss", "log_loss", "last_loss", "noise_g2", "noise_trace")
# The whole-step decision and what it was made from (host values, the same on every rank).
_ENGINE_HOST = ("whole", "kappa", "forwards_skipped")
_MICRO_HOST = ("target", "seen", "computed")  # adaptive accumulation's decision and counts


def rank_local(engine):
    """This rank's row of the rank-local statistics, to be gathered across ranks before saving."""
    return torch.cat([getattr(engine, k).double().reshape(-1) for k in RANK_LOCAL])


def engine_state(engine, rows=None):
    """`rows`: the gathered [world, len(RANK_LOCAL)] rank-local statistics (this rank's alone: None)."""
    tensors, meta = {}, {}
    for key, value in engine.tracker.state_dict().items():  # (per-tensor values: indexed as the parameters)
        if isinstance(value, torch.Tensor):
            tensors[f"tracker/{key}"] = value
        else:
            meta[f"tracker/{key}"] = value
    for name in ("mirror", "cycle_mirror"):  # the values the next decisions read (posted, not yet read)
        for key, value in getattr(engine, name).state_dict().items():
            tensors[f"{name}/{key}"] = value
    meta["engine/mirror_meta"] = [list(m) for m in engine.mirror_meta]
    tensors["engine/rank_local"] = rank_local(engine)[None] if rows is None else rows
    for key, value in engine.consistency.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[f"consistency/{key}"] = value
        else:
            meta[f"consistency/{key}"] = value
    for key, value in engine.noise.state_dict().items():
        if key in ("g2", "trace"):  # rank-local, in engine/rank_local
            continue
        if isinstance(value, torch.Tensor):
            tensors[f"noise/{key}"] = value
        else:
            meta[f"noise/{key}"] = value
    for name in _ENGINE_HOST:
        meta[f"engine/{name}"] = getattr(engine, name)
    for name in _MICRO_HOST:
        meta[f"micro/{name}"] = getattr(engine.micro, name)
    meta["engine/drop"] = list(engine.drop)
    for name in _ENGINE_INTS:
        meta[f"engine/{name}"] = getattr(engine, name)
    meta["engine/phase"] = -1 if engine.phase is None else int(engine.phase)
    meta["engine/seconds"] = engine.seconds
    meta["controller"] = engine.controller.state_dict()
    meta["settings"] = {k: getattr(engine.args, k) for k in STATE_SETTINGS}
    meta["version"] = STATE_VERSION
    return tensors, meta


def save_engine(engine, directory, rows=None):
    """Write `directory/vsa_state.safetensors` via a temp file and rename, so a crash mid-save
    never leaves a partial file that a resume would trust."""
    tensors, meta = engine_state(engine, rows)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path = os.path.join(directory, STATE_FILE)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt", "hf_vsa": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_engine(engine, directory, rank=0, world=1):
    """Restore state saved by save_engine onto the parameters' device; refuse any mismatch
    with a ValueError that names the file. Rank-local statistics: this rank's row when the world
    size is unchanged, else every rank takes the mean row (so the cross-rank mean is kept)."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no VSA state in this checkpoint (saved with save_only_model, or not by VSATrainer). "
            "Pass vsa_reset_state_on_resume=True to start the VSA state from scratch.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads(f.metadata()["hf_vsa"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # corrupt or truncated bytes, or a foreign file
        raise ValueError(f"{path}: cannot read VSA state ({type(e).__name__}: {e})") from e
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: VSA state format version {meta.get('version')} (None: written by an earlier "
                         f"hf_vsa); this hf_vsa reads version {STATE_VERSION}. Pass vsa_reset_state_on_resume=True "
                         "to start the VSA state from scratch.")
    settings = {k: getattr(engine.args, k) for k in STATE_SETTINGS}
    changed = {k: (meta["settings"].get(k), v) for k, v in settings.items() if meta["settings"].get(k) != v}
    if changed:
        raise ValueError(f"{path}: saved with different settings (saved, now): {changed}")
    names = {k for k in list(tensors) + list(meta) if k.startswith("tracker/")}  # (checked by the tracker)
    try:  # rebuilds the saved layout (probe's sample, or the tracked tensors), then checks every shape
        engine.tracker.load_state_dict({k[len("tracker/"):]: tensors[k] if k in tensors else meta[k] for k in names})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad tracker state ({type(e).__name__}: {e}); it depends on the model's trainable "
                         "parameters and the hf_vsa settings: resume with the saved ones, or pass "
                         "vsa_reset_state_on_resume=True") from e
    dev = engine.params[0].device
    try:
        restored = engine.consistency.load_state_dict(
            {k: tensors[f"consistency/{k}"] if isinstance(v, torch.Tensor) else meta[f"consistency/{k}"]
             for k, v in engine.consistency.state_dict().items()})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: bad block consistency state ({type(e).__name__}: {e}); the droppable blocks "
                         "follow the model, vsa_exact_fraction and vsa_block_drop < 1: resume with the saved "
                         "ones, or pass vsa_reset_state_on_resume=True") from e
    saved_noise = {k[len("noise/"):]: v for k, v in tensors.items() if k.startswith("noise/")}
    saved_noise.update({k[len("noise/"):]: v for k, v in meta.items() if k.startswith("noise/")})
    saved_noise.update(g2=engine.noise.g2, trace=engine.noise.trace)  # rank-local: restored with engine/rank_local below
    try:
        noise_restored = engine.noise.load_state_dict(saved_noise)
        if not noise_restored:
            logger.warning("hf_vsa: %s: the gradient noise scale was measured with %s gradients per optimizer step "
                           "(accumulation steps x processes), this run has %d; its measurement starts afresh",
                           path, saved_noise.get("micro"), engine.noise.micro)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: bad noise-scale state ({type(e).__name__}: {e}); it depends on "
                         "gradient_accumulation_steps and the number of processes: resume with the saved ones, "
                         "or pass vsa_reset_state_on_resume=True") from e
    for name in _ENGINE_HOST:
        value = meta.get(f"engine/{name}")
        if not isinstance(value, (bool, int, float)):
            raise ValueError(f"{path}: engine/{name} must be a number, got {value!r}")
        setattr(engine, name, type(getattr(engine, name))(value))
    for name in _MICRO_HOST:
        value = meta.get(f"micro/{name}")
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: micro/{name} must be an int >= 0, got {value!r}")
        setattr(engine.micro, name, value)
    if not noise_restored:  # another accumulation or world size: all micro-batches until measured anew
        engine.micro.target = engine.accum
    drop = meta["engine/drop"]
    if not restored:  # saved or resumed with vsa_block_drop=1: no block measured; the measurement starts now
        drop = [engine.args.vsa_block_drop] * len(engine.blocks)
    if (not isinstance(drop, list) or len(drop) != len(engine.blocks)
            or not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in drop)):
        raise ValueError(f"{path}: engine/drop must list one probability in [0, 1] per droppable block "
                         f"({len(engine.blocks)}), got {str(drop)[:80]}")
    engine.drop = [float(d) for d in drop]
    rows = tensors["engine/rank_local"]
    sizes = [getattr(engine, k).numel() for k in RANK_LOCAL]
    if rows.ndim != 2 or rows.shape[1] != sum(sizes):
        raise ValueError(f"{path}: engine/rank_local is {tuple(rows.shape)}, expected (world, {sum(sizes)})")
    row = rows[rank] if rows.shape[0] == world else rows.mean(0)
    for name, value in zip(RANK_LOCAL, row.split(sizes)):
        mine = getattr(engine, name)
        setattr(engine, name, value.to(dev, mine.dtype).reshape(mine.shape))
    if not noise_restored:
        engine.noise_g2, engine.noise_trace = torch.zeros_like(engine.noise_g2), torch.zeros_like(engine.noise_trace)
    for name in _ENGINE_INTS:
        setattr(engine, name, int(meta[f"engine/{name}"]))
    engine.phase = None if meta["engine/phase"] < 0 else Phase(meta["engine/phase"])
    engine.seconds = {k: float(v) for k, v in meta["engine/seconds"].items()}
    engine.controller.load_state_dict(meta["controller"])
    for name in ("mirror", "cycle_mirror"):
        saved = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + "/")}
        if sorted(saved) not in ([], ["slot0"], ["slot0", "slot1"]) or any(v.ndim != 1 for v in saved.values()):
            raise ValueError(f"{path}: {name}/ must hold slot0 and slot1 (1-D), got {sorted(saved)}")
        getattr(engine, name).load_state_dict(saved, dev)
    mirror_meta = meta.get("engine/mirror_meta")
    if (not isinstance(mirror_meta, list) or len(mirror_meta) != len(engine.mirror.slots)
            or not all(isinstance(m, list) and len(m) == 2 for m in mirror_meta)):
        raise ValueError(f"{path}: engine/mirror_meta must list one [noise measured, consistency measured] per "
                         f"mirror slot, got {str(mirror_meta)[:80]}")
    engine.mirror_meta = [tuple(int(x) for x in m) for m in mirror_meta]
    return path
