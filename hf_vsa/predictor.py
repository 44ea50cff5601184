"""Closed-form gradient prediction over lists of tensors.

The WLS predictor fits g(t) = baseline + velocity * t per element over all recorded gradients,
weighted by decay**(T - t_i) (T: the newest record). It never stores the history: the normal
equations only need running sums. Since WLS is invariant to a common factor in the weights, each
record is added with the *growing* weight c_i = decay**-(t_i - origin), so recording is two fused
adds and nothing old is rescaled; the origin moves forward (one rescale) before c grows large.

    sw = sum c,  st = sum c u,  stt = sum c u^2       (u = t - origin; host floats, from the schedule)
    G0 = sum c g,  G1 = sum c u g                     (one buffer each per tensor)

and Cramer's rule gives the prediction at u as a0 * G0 + a1 * G1. Memory: 2x the tracked tensors
(fp32), plus 1x for the residual, whatever the history length, allocated at the first record. The
'momentum' kind keeps one bias-corrected EMA buffer instead.

With compression ('ternary' or 'vsa', see compress.py) the running sums are replaced by a ring of
the last `window` records in compressed form (compressed sums would gather rounding error at every
record); the same fit is solved over the ring's records, and the prediction is read back as one
weighted sum of them. The residual is stored in 4 bits (int4_pack), not ternary, since it is the
newest and least averaged part of a prediction. On the 106M GPT-2's real gradients
(bench_memory.py part 1) the prediction's cosine with the next gradient was 0.904 with a ternary
residual, 0.933 with a 4-bit one, and 0.925 with 'none'.

Tensor work stays on the tensors' device; the only host read is the finiteness check when a
gradient is recorded (a backprop step), marked below.
"""
import logging

import torch

from .autoregress import ar_fit, ar_weights
from .fits import ring_weights, wls_coefficients
from .compress import CompressedHistory, blocks_of, dequantize, int4_pack, packed_bytes

logger = logging.getLogger(__name__)
KINDS = ("wls", "momentum", "ar")
_RESCALE_AT = 1e4  # move the origin before record weights exceed this (or 1000 steps pass)


def all_finite(tensors) -> torch.Tensor:
    """0-dim bool tensor on the tensors' device: every element of every tensor is finite."""
    return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).sum().isfinite()


class GradientPredictor:
    """record(grads, t), predict(t), correct(grads, t); state_dict() round-trips."""

    def __init__(self, params, kind="wls", decay=0.95, residual_decay=0.5, momentum=0.9,
                 compression="none", window=8, block=256, rounding="deterministic", bundle=4, seed=0,
                 order=2, ridge=1e-3, groups=None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.params = list(params)
        if not self.params:
            raise ValueError("GradientPredictor needs at least one tensor to track")
        self.kind, self.decay, self.residual_decay, self.momentum = kind, decay, residual_decay, momentum
        self.block, self.order, self.ridge = block, order, ridge
        # Chunks of one flat tensor standing for many (flat.Windows, aligned to `block`): ([the group of each
        # block of each chunk], number of groups); the AR fit is then one per group, as it is one per tensor.
        if groups is not None and len(groups[0]) != len(self.params):
            raise ValueError("GradientPredictor: groups need one block-owner tensor per tracked tensor")
        self.groups = groups
        self._fit = None  # ar: (newest record's step, active tensors, coefficients [len(active), order])
        self.history = None
        if compression == "none" and kind != "ar":  # (ar needs the records themselves: an fp32 ring)
            used = ["g0"] + (["g1"] if kind == "wls" else []) + (["residual"] if residual_decay > 0 else [])
        else:
            self.history = CompressedHistory(self.params, compression, window, block, rounding, bundle, seed)
            used = ["rcodes", "rscales"] if residual_decay > 0 else []
        # Buffers are allocated at the first record (see allocate), so tensors dropped before it
        # never cost memory; until then each is an empty tensor of the right dtype.
        for name in self._BUFFERS:
            setattr(self, name, [self._buffer(name, i, empty=True) for i in range(len(self.params))]
                    if name in used else [])
        self._allocated = False
        self.active = list(range(len(self.params)))  # the tensors recorded and compared
        self.sw = self.st = self.stt = 0.0
        self.origin = 0
        self.last_t = -1  # newest record; -1: none yet
        self.residual_t = -1  # when the residual was learned; -1: none yet
        # non-finite gradients met (recorded as zeros): counted on the device, read at logging steps
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.params[0].device)

    def _buffer(self, name, i, empty=False):
        p = self.params[i]
        if name == "rcodes":
            return torch.zeros(0 if empty else packed_bytes(p.numel(), self.block, 4), dtype=torch.uint8,
                               device=p.device)
        if name == "rscales":
            return torch.zeros(0 if empty else blocks_of(p.numel(), self.block), device=p.device)
        dtype = torch.promote_types(p.dtype, torch.float32)  # g0, g1, residual
        return p.new_zeros(0, dtype=dtype) if empty else torch.zeros_like(p, dtype=dtype)

    def allocate(self):
        """Full-size buffers for the active tensors, once (at the first record, or when state
        holding records is loaded)."""
        if self._allocated:
            return
        for name in self._BUFFERS:
            xs = getattr(self, name)
            for i in self.active:
                if xs and not xs[i].numel():
                    xs[i] = self._buffer(name, i)
        if self.history is not None:
            self.history.allocate(self.active)
        self._allocated = True

    def set_active(self, active):
        """Track only the tensors in `active` (indices into params; may be none); the others' buffers
        are freed (left as empty tensors), so they cost no state memory. A freed tensor cannot come
        back: its history is gone."""
        active = sorted({int(i) for i in active})
        if active and (active[0] < 0 or active[-1] >= len(self.params)):
            raise ValueError(f"predictor active indices must be a subset of 0..{len(self.params) - 1}, "
                             f"got {active[:5]}...")
        self.active = active
        keep = set(active)
        holders = [getattr(self, name) for name in self._BUFFERS]
        if self.history is not None:
            holders += [getattr(self.history, name) for name in self.history.BUFFERS]
        for xs in holders:
            for i, x in enumerate(xs):
                if i not in keep and x.numel():
                    xs[i] = x.new_empty(0)

    def compact(self, keep, stand_ins, groups=None) -> bool:
        """Chunks of one flat tensor (flat.Windows aligned to `block`) lose some of the tensors they stand
        for: keep only the blocks in `keep` (a device index tensor into the chunks' blocks taken in order),
        records and fit included, and track `stand_ins` (chunks of that many blocks in all) from now on.
        vsa bundles bind each position to a key drawn for the whole chunk, so their records cannot be
        cut: False, and the caller starts a new history."""
        if self.history is not None and self.history.kind == "vsa":
            return False
        b = self.block
        sizes = [blocks_of(x.numel(), b) for x in stand_ins]

        def cut(xs, per_block):  # per chunk [..., blocks * per_block] -> the kept blocks, chunked anew
            if not xs:
                return xs
            if not any(x.numel() for x in xs):  # not allocated yet
                return [xs[0].new_empty(0) for _ in stand_ins]
            lead = xs[0].shape[:-1]
            joined = torch.cat([x.reshape(*lead, -1, per_block) for x in xs], len(lead))
            kept = joined.index_select(len(lead), keep)
            return [c.reshape(*lead, -1).clone() for c in kept.split(sizes, len(lead))]
        for name, per in (("g0", b), ("g1", b), ("residual", b), ("rcodes", b // 2), ("rscales", 1)):
            setattr(self, name, cut(getattr(self, name), per))
        h = self.history
        if h is not None:
            per = b if h.kind == "none" else b * h.bits // 8
            h.codes, h.scales = cut(h.codes, per), cut(h.scales, 1)
            h.error, h.error_scales = cut(h.error, b), cut(h.error_scales, 1)
            h.params = list(stand_ins)
        self.params = list(stand_ins)
        self.active = list(range(len(self.params)))
        self.groups = groups
        self._fit = None
        return True

    # ---- recording -------------------------------------------------------------------------
    def _pick(self, xs):
        return [xs[i] for i in self.active]

    def record(self, grads, t: int, finite=None) -> bool:
        """Add the gradient observed at optimizer step t (one per tensor; only the active tensors
        are recorded). A non-finite one (an fp16 overflow) is recorded as zeros and counted in
        `skipped`, decided on the device: no host sync. `finite`: the caller's 0-dim check of the
        active gradients, when it already has one (saves a pass over them)."""
        if not self.active:  # every tensor dropped or retired: nothing left to record
            self.last_t = t
            return True
        if finite is None:
            finite = all_finite(self._pick(grads))
        self.skipped += (~finite).long()
        self.allocate()
        # (a non-finite record's zeros are made one tensor at a time: one copy alive, not one per tensor)
        zeroed = lambda i: torch.where(finite, grads[i], 0.0)  # noqa: E731
        if self.history is not None:
            self.history.push(grads, t, self.active, finite)
        elif self.kind == "momentum":
            for i in self.active:
                self.g0[i].lerp_(zeroed(i).to(self.g0[i].dtype), 1.0 - self.momentum)
            self.sw = self.sw * self.momentum + (1.0 - self.momentum)  # bias correction, 1 - momentum**n
        else:
            if self.last_t < 0:
                self.origin = t
            elif self.decay ** -(t - self.origin) > _RESCALE_AT or t - self.origin > 1000:
                self._move_origin(t)
            u = float(t - self.origin)
            c = self.decay ** -u
            for i in self.active:
                g = zeroed(i)
                self.g0[i].add_(g, alpha=c)
                if u:
                    self.g1[i].add_(g, alpha=c * u)
            self.sw, self.st, self.stt = self.sw + c, self.st + c * u, self.stt + c * u * u
        self.last_t = t
        return True

    def _move_origin(self, t):
        """Re-reference times to t (u -> u - s) and rescale weights by decay**s: same fit."""
        s = float(t - self.origin)
        k = self.decay ** s
        g0, g1 = self._pick(self.g0), self._pick(self.g1)
        torch._foreach_add_(g1, g0, alpha=-s)
        torch._foreach_mul_(g0, k)
        torch._foreach_mul_(g1, k)
        self.stt = (self.stt - 2 * s * self.st + s * s * self.sw) * k
        self.st = (self.st - s * self.sw) * k
        self.sw *= k
        self.origin = t

    # ---- prediction ------------------------------------------------------------------------
    def predict_base(self, t: int, index=None, into=None):
        """The fit at step t without the residual, for the tensors in `index` (None: the active
        ones, i.e. all unless some were dropped); fresh fp32 (or wider) tensors, or written into
        `into` (fp32, one per tensor of `index`, whole blocks: a compressed or AR history only)."""
        self.allocate()  # (no record yet: the zero buffers predict zero)
        index = self.active if index is None else index
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        if self.kind == "ar":
            return self.history.weighted_sum(self.ar_weights(t, index), index, into=into)
        if self.history is not None:
            return self.history.weighted_sum(ring_weights(self.history.filled(), t, self.kind, self.decay, self.momentum),
                                              index, into=into)
        if self.kind == "momentum":
            return torch._foreach_mul(pick(self.g0), 1.0 / self.sw if self.sw > 0 else 0.0)
        a0, a1 = wls_coefficients(self.sw, self.st, self.stt, float(t - self.origin))
        out = torch._foreach_mul(pick(self.g0), a0)
        if a1:
            torch._foreach_add_(out, pick(self.g1), alpha=a1)
        return out

    def ar_coefficients(self):
        """(record steps oldest first, their slots, {tensor: row}, coefficients [rows, order]) of the AR
        fit over the ring's records, refitted only when a record has come in since the last fit (rows:
        the active tensors, or a flat tensor's groups)."""
        filled = sorted(self.history.filled(), key=lambda kt: kt[1])
        slots, times = [k for k, _ in filled], [t for _, t in filled]
        key = (tuple(times), tuple(self.active))
        if self._fit is None or self._fit[0] != key:
            gram = self.history.gram(self.active, slots, self.groups)
            self._fit = key, ar_fit(gram, times, self.order, self.ridge)
        rows = {i: r for r, i in enumerate(self.active)}
        return times, slots, rows, self._fit[1]

    def ar_weights(self, t: int, index) -> dict:
        """{slot: per-tensor weights over `index`} of the AR forecast of step t (device tensors; for a flat
        tensor with groups, [1, blocks]: each block weighted by its group's forecast)."""
        if not self.history.filled():
            return {}
        times, slots, rows, coeffs = self.ar_coefficients()
        if self.groups is not None:  # each block weighted by its group's forecast: [blocks] per tensor
            w = ar_weights(coeffs, times, t).float()
            per = [w[self.groups[0][i]] for i in index]  # [blocks, n] per tensor
            return {k: [x[:, j] for x in per] for j, k in enumerate(slots)}
        picked = coeffs[[rows[i] for i in index]]
        w = ar_weights(picked, times, t).float()  # [len(index), n]
        return {k: w[:, j] for j, k in enumerate(slots)}

    def _residual_weight(self, t):
        if self.residual_t < 0 or not (self.residual or self.rcodes):
            return 0.0
        return self.residual_decay ** (t - self.residual_t)

    def _residual(self, i):
        if self.history is None:
            return self.residual[i]
        return dequantize(self.rcodes[i], self.rscales[i], self.params[i].numel(), self.block, 4).view_as(self.params[i])

    def _learn_residual(self, i, r):
        """r: the new residual of tensor i."""
        if self.history is None:
            self.residual[i].copy_(r)
        else:
            codes, scales = int4_pack(r, self.block)
            self.rcodes[i].copy_(codes)
            self.rscales[i].copy_(scales)

    def predict(self, t: int, index=None, into=None):
        """The prediction for step t (fit plus decayed residual), for the tensors in `index`
        (None: the active ones); `into`: see predict_base."""
        index = self.active if index is None else index
        out = self.predict_base(t, index, into)
        w = self._residual_weight(t)
        if w:
            for i, x in zip(index, out):  # (one residual decoded at a time)
                x.add_(self._residual(i), alpha=w)
        return out

    def correct(self, grads, t: int, finite=None, visit=None):
        """At a CORRECT step: compare the prediction for t with the actual gradient, learn the
        residual (actual - fit), then record. Returns device tensors: (cosine, relative residual,
        per-tensor cosine, per-tensor trust, per-tensor [<g, p>, |g|^2, |p|^2] as a [3, tensors]
        tensor), NaN where the gradient was not finite (or the tensor is not tracked). A tensor's
        trust is the least-squares scale of its prediction p against the actual gradient g,
        <g, p> / |p|^2 (the multiple of p closest to g), clipped to [0, 1]. `grads` is read one
        tensor at a time, in order, twice (compared, then recorded): a sequence that makes each on
        demand (a flat history's chunks, tracking.Gathered) keeps one alive at a time. `finite`: as
        in record. `visit(i, actual, prediction)`: called for each active tensor once compared."""
        if finite is None:
            finite = all_finite(self._pick(grads))
        w = self._residual_weight(t)
        learn = self.residual_decay > 0
        a2, p2, d2 = [], [], []
        # One tensor at a time (a flat history's chunks): its temporaries are freed before the next's.
        for i in self.active:
            a = grads[i].to(torch.promote_types(self.params[i].dtype, torch.float32))
            p = self.predict_base(t, [i])[0]
            fresh = a - p if learn else None  # actual - fit
            if w:
                p.add_(self._residual(i), alpha=w)
            diff = a - p
            for out, x in ((a2, a), (p2, p), (d2, diff)):
                out.append(torch.linalg.vector_norm(x))
            del diff
            if fresh is not None:  # (the residual is read above, for this tensor only: learnt now; a
                # non-finite step learns a zero residual, decided on the device)
                self._learn_residual(i, torch.where(finite, fresh, 0.0))
            if visit is not None:
                visit(i, a, p)
            del a, p, fresh
        if learn:
            self.residual_t = t
        a2, p2, d2 = (torch.stack(x).double() ** 2 for x in (a2, p2, d2))
        dots = (a2 + p2 - d2) / 2  # a.p from three norms: no extra full-size buffer
        per_tensor = self._spread((dots / (a2.sqrt() * p2.sqrt()).clamp_min(1e-30)).clamp(-1.0, 1.0))
        trust = self._spread((dots / p2.clamp_min(1e-30)).clamp(0.0, 1.0))
        cosine = (dots.sum() / (a2.sum().sqrt() * p2.sum().sqrt()).clamp_min(1e-30)).clamp(-1.0, 1.0)
        rel_residual = d2.sum().sqrt() / a2.sum().sqrt().clamp_min(1e-30)
        parts = torch.stack([self._spread(x) for x in (dots, a2, p2)])
        self.record(grads, t, finite=finite)
        # NaN where the gradient was not finite (an fp16 overflow measures nothing)
        return cosine, rel_residual, per_tensor, trust, parts

    def _spread(self, values):
        """Per-active-tensor values -> one per tensor, NaN for the inactive ones."""
        if len(self.active) == len(self.params):
            return values
        out = torch.full((len(self.params),), float("nan"), dtype=values.dtype, device=values.device)
        out[torch.tensor(self.active, device=values.device)] = values
        return out

    def bytes_per_element(self) -> float:
        """The state bytes one tracked element costs with these settings, measured on a small stand-in
        (the same buffers: history, scales, error feedback, residual)."""
        n = 4 * self.block
        probe = GradientPredictor([torch.zeros(n)], kind=self.kind, decay=self.decay, residual_decay=self.residual_decay,
                                  momentum=self.momentum, compression=self.history.kind if self.history else "none",
                                  window=self.history.window if self.history else 8, block=self.block,
                                  bundle=self.history.bundle if self.history else 4, order=self.order, ridge=self.ridge)
        probe.allocate()
        return sum(v.numel() * v.element_size() for k, v in probe.state_dict().items()
                   if isinstance(v, torch.Tensor) and k != "skipped") / n

    # ---- state -----------------------------------------------------------------------------
    _SCALARS = ("sw", "st", "stt", "origin", "last_t", "residual_t", "active")

    _BUFFERS = ("g0", "g1", "residual", "rcodes", "rscales")

    def _tensors(self) -> dict:
        s = {f"{name}.{i}": x for name in self._BUFFERS for i, x in enumerate(getattr(self, name))}
        s["skipped"] = self.skipped
        if self.history is not None:
            s.update(self.history.tensors())
        return s

    def state_dict(self) -> dict:
        s = {k: getattr(self, k) for k in self._SCALARS}
        if self.history is not None:
            s["ring_times"], s["ring_next"] = list(self.history.times), self.history.next
        s.update(self._tensors())
        return s

    def load_state_dict(self, state: dict, names=None):
        """`names`: the tensors' names (by index), for the error messages; None: by index."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise KeyError(f"predictor state keys differ: missing {sorted(expected - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - expected)[:5]}")
        active = [int(i) for i in state["active"]]
        if active != self.active:
            freed = sorted(set(active) - set(self.active))
            if freed:
                raise ValueError(f"predictor state active: tensors {freed[:5]} are tracked in the state but not here")
            self.set_active(active)  # the shapes below depend on it
        if any(state[key].numel() for key in self._tensors() if key != "skipped"):  # the state holds records
            self.allocate()
        tensors = self._tensors()
        for key, x in tensors.items():  # check every shape before anything is overwritten
            v = state[key]
            if v.shape != x.shape or v.dtype != x.dtype:
                kind, i = key.split(".") if "." in key else (key, "")
                label = f"{kind}.{i if names is None or not i else names[int(i)]}"
                raise ValueError(f"predictor state {label}: expected {tuple(x.shape)} {x.dtype}, but the saved "
                                 f"{label} is {tuple(v.shape)} {v.dtype}")
        for key, x in tensors.items():
            x.copy_(state[key])
        self._fit = None  # the AR fit is derived from the records: refitted from the loaded ones
        for k in self._SCALARS:
            if k != "active":
                setattr(self, k, type(getattr(self, k))(state[k]))
        if self.history is not None:
            times = [int(x) for x in state["ring_times"]]
            if len(times) != self.history.window:
                raise ValueError(f"predictor state ring_times has {len(times)} slots, the window is "
                                 f"{self.history.window}")
            self.history.times, self.history.next = times, int(state["ring_next"])
