"""What the prediction tracks, and the gate that decides where it is used.

The predictor always runs on ONE flat tensor (flat.Windows, aligned to the compression block, so each
block belongs to one parameter): first the probe's sample of every tensor (probe.py), then, once the
prediction has earned it, the whole of the tensors promoted within vsa_state_budget. It is handed to
the predictor in chunks of CHUNK elements, each gathered from the gradients when it is read (Gathered)
and worked through one at a time (temporaries: a chunk's; the gradient is never copied whole).
Recording, predicting and comparing are thus a few ops per chunk whatever the number of tensors;
per-tensor figures (the gate's cosines, trust factors, the probe's gains) are segment sums over the
flat tensor, and the AR fit is one per parameter (its blocks' inner products summed per owner). A
prediction reaches .grad as views of one flat buffer (no op per tensor).

Host syncs here: one per CORRECT step (`_correct`, its measurements in one `tolist`), one per run
where a full history starts with vsa_skip_sparse (`_drop_sparse`), and at load.
"""
import logging
import math

import torch

from .compress import blocks_of
from .policy import WORTH_WINDOW, admitted, lower_bound
from .predictor import GradientPredictor, all_finite
from .probe import probe_windows
from .flat import Gathered, Windows

logger = logging.getLogger(__name__)
_RUNNING = 4  # the gate's per-tensor figures: running means over the last few CORRECT steps
# The flat tensor is handed to the predictor in chunks of at most this many elements (whole blocks), which
# it works through one at a time: its temporaries are a chunk's, not the whole history's.
CHUNK = 1 << 24


class Tracker:
    """The sample the predictor tracks, the predictor, and the gate's measurements; state_dict() round-trips."""

    def __init__(self, args, params, names):
        self.args, self.params, self.names = args, list(params), list(names)
        n, dev = len(self.params), self.params[0].device
        self.gate_off = args.vsa_min_cosine <= -1.0
        # With the gate on, the predictor first tracks a sample of each tensor (the probe); the tensors
        # promote() chooses get a full history once the prediction has earned it.
        self.probing = args.vsa_probe_fraction > 0 and not self.gate_off
        self.tracked = [] if self.probing else list(range(n))  # tensors with a full history
        self.sparse = []  # tensors vsa_skip_sparse left out: they change on backprop steps only
        self.skipped = torch.zeros((), dtype=torch.int64, device=dev)  # non-finite records met (read at logs)
        self._build()
        self.closed = [0] * n  # consecutive CORRECT steps at which the gate kept each tensor out
        self.earn = []  # on the probe's sample, at the last CORRECT steps: 1 - |g - p|^2 / |g|^2 (host floats)
        self.worth = []  # energy * cosine of the admitted predictions at the last WORTH_WINDOW CORRECT steps
        self.admitted_cosine, self.admitted_energy = math.nan, 0.0  # at the last CORRECT step (host floats)
        self.corrections = 0  # CORRECT steps measured (probe or full)
        self.tensor_measured = 0  # of those, the ones that measured full histories per tensor
        self.cosine = torch.full((), math.nan, dtype=torch.float64, device=dev)
        self.cosine_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.tensor_cosine = torch.zeros(n, dtype=torch.float64, device=dev)  # running means, per tensor
        self.tensor_trust = torch.zeros(n, dtype=torch.float64, device=dev)
        self.tensor_gain = torch.zeros(n, dtype=torch.float64, device=dev)  # the probe's
        self.gain_host = None  # host copy of tensor_gain, read at CORRECT steps
        self.peak_state_ratio = 0.0  # largest state so far (its buffers are allocated at the first record)
        # Host copies (predict_mask, trust), refreshed at CORRECT steps only. Nothing is measured yet: only
        # an open gate admits.
        self.refresh_mask()

    # ---- layout ------------------------------------------------------------------------------
    def _build(self):
        """A fresh sample (probe's or full) and a predictor over it, with no record."""
        self.windows = self._windows()
        self.predictor = self._new_predictor()

    def _windows(self):
        a = self.args
        if self.probing:
            return probe_windows(self.params, a.vsa_probe_fraction, a.vsa_seed, a.vsa_compression_block)
        return Windows(self.params, 0, a.vsa_seed, 4, fraction=1.0, scaled=False, select=self.tracked,
                       align=a.vsa_compression_block)

    def _new_predictor(self):
        predictor = GradientPredictor(self._stand_ins(), **self._predictor_settings(), groups=self._groups())
        predictor.skipped = self.skipped  # a run's count of refused records, not a history's (shared)
        return predictor

    def _sizes(self):
        """Elements of each chunk of the flat tensor (at least one chunk, maybe empty)."""
        n, block = self.windows.numel, self.args.vsa_compression_block
        step = max(block, CHUNK // block * block)
        return [min(step, n - s) for s in range(0, n, step)] or [0]

    def _stand_ins(self):
        zero = self.params[0].new_zeros(1, dtype=torch.float32)
        return [zero.expand(k) for k in self._sizes()]

    def _groups(self):
        """Per chunk, the owning tensor of each of its blocks; and the number of tensors."""
        block, owners, start = self.args.vsa_compression_block, [], 0
        for k in self._sizes():
            owners.append(self.windows.block_owner[start:start + k // block])
            start += k // block
        return owners, self.windows.n_groups

    def _chunks(self, flat):
        return list(flat.split(self._sizes()))  # (views)

    def _predictor_settings(self):
        a = self.args
        return dict(kind=a.vsa_predictor, decay=a.vsa_history_decay, residual_decay=a.vsa_residual_decay,
                    momentum=a.vsa_momentum, compression=a.vsa_compression, window=a.vsa_history_window,
                    block=a.vsa_compression_block, rounding=a.vsa_ternary_rounding, bundle=a.vsa_bundle_size,
                    seed=a.vsa_seed, order=a.vsa_ar_order, ridge=a.vsa_ar_ridge)

    @property
    def active(self) -> bool:
        """Something is tracked: the probe's sample, or at least one full history."""
        return self.probing or bool(self.tracked)

    @property
    def history(self):
        return self.predictor.history

    def within_budget(self):
        """The tensors a full history is kept for: those vsa_track_modules names whose prediction the probe
        measured to beat the zero gradient (running gain > 0), best first, while their history fits in
        vsa_state_budget bytes per trainable parameter. Host values only."""
        names = self.args.vsa_track_modules
        allowed = [i for i, n in enumerate(self.names) if names is None or any(m in n for m in names)]
        gains = self.gain_host or [0.0] * len(self.params)
        order = sorted((i for i in allowed if gains[i] > 0), key=lambda i: -gains[i])
        per_element, block = self.predictor.bytes_per_element(), self.args.vsa_compression_block
        budget = self.args.vsa_state_budget * sum(p.numel() for p in self.params)
        chosen, used = [], 0.0
        for i in order:
            cost = per_element * blocks_of(self.params[i].numel(), block) * block  # (whole blocks)
            if used + cost <= budget:
                chosen.append(i)
                used += cost
        return sorted(chosen)

    def earned(self) -> bool:
        """The prediction is measurably better than the zero gradient on the probe's sample: a lower
        confidence bound (policy.lower_bound) of 1 - |g - p|^2 / |g|^2 over the recent CORRECT
        steps is above 0. (E|g - p|^2 = |G - p|^2 + noise and E|g|^2 = |G|^2 + noise, with G the mean
        gradient: above 0 means p is closer to G than 0 is, the optimizer's coasting on its momentum.)"""
        bound = lower_bound(self.earn)
        return bound == bound and bound > 0

    def promote(self, step=-1, log=True):
        """The probe ends: the tensors within_budget() get a full history from now on, starting empty
        (vsa_skip_sparse drops the mostly-zero ones at its first record); the gate then measures each
        at the CORRECT steps that follow."""
        self.probing = False
        self.tracked = self.within_budget()
        self._build()
        self.refresh_mask()
        if log:
            logger.info("hf_vsa: step %d: probe done; %d of %d tensors tracked in full from now on: %s", step,
                        len(self.tracked), len(self.params), [self.names[i] for i in self.tracked])

    def untrack(self, indices, why, step=-1):
        """Stop predicting and recording these tensors; their blocks leave the flat history (no way back)."""
        gone = set(indices)
        self.tracked = [i for i in self.tracked if i not in gone]
        old, self.windows = self.windows, self._windows()
        keep = torch.tensor(old.blocks_of(self.tracked), dtype=torch.long).to(old.block_owner.device)
        if not self.predictor.compact(keep, self._stand_ins(), self._groups()):
            self.predictor = self._new_predictor()  # (vsa bundles cannot be cut: a new, empty history)
        for i in gone:
            self.predict_mask[i] = False
        logger.info("hf_vsa: step %d: %d tensors %s; %d of %d still tracked: %s", step, len(gone), why,
                    len(self.tracked), len(self.params), [self.names[i] for i in sorted(gone)])

    # ---- per backprop step ---------------------------------------------------------------------
    def observe(self, grads, step, correct, inv_scale=None):
        """The step's gradients (`grads`: .grad of every parameter, None where there is none): recorded,
        or at a CORRECT step compared with the prediction first. They reach the predictor chunk by
        chunk, each gathered when it is read (Gathered): one chunk's copy alive at a time. Returns the
        relative residual of the prediction at a CORRECT step (a host float: the one sync), else None."""
        if not self.active:
            return None
        g = Gathered(self.windows, self._sizes(), grads, inv_scale)
        if not self.probing and self.predictor.last_t < 0 and self.args.vsa_skip_sparse:
            g = self._drop_sparse(g, grads, inv_scale, step)
            if not self.tracked:
                return None
        # finite: on a kept sample (one chunk, the probe's), its own elements; on a chunked history, the
        # gradients themselves (the chunks are theirs, times finite scales): one foreach norm either way
        if g.kept is not None:
            finite = all_finite([g.kept])
        else:
            sampled = [t for t, k in zip(grads, self.windows.lengths) if k and t is not None]
            finite = all_finite(sampled) if sampled else torch.ones((), dtype=torch.bool, device=self.skipped.device)
        first = self.predictor.last_t < 0
        if correct:
            rel = self._correct(g, step, finite)
        else:
            self.predictor.record(g, step, finite=finite)
            rel = None
        if first:  # the buffers were just allocated: the peak (host arithmetic, no sync)
            self.peak_state_ratio = max(self.peak_state_ratio, self.state_memory_ratio())
        return rel

    def _drop_sparse(self, g, grads, inv_scale, step):
        """Before a full history's first record (once per run, where the prediction earned it): tensors
        whose gradient is mostly exact zeros (embedding rows of tokens absent from the batch) are never
        predicted nor recorded; they change on backprop steps only. Their prediction would move rows the
        batch never touched. Returns the gradients to gather for the tensors still tracked."""
        zeros = None
        for x, start in g.each():
            z = self.windows.segment_sum((x == 0).float(), start=start)
            zeros = z if zeros is None else zeros + z
        zeros = zeros.tolist()  # host sync: once per run, at the full history's first record
        pads = [k - n for k, n in zip(self.windows.padded, self.windows.lengths)]  # (the aligning zeros)
        sparse = [i for i in self.tracked if zeros[i] - pads[i] >= 0.5 * self.params[i].numel()]
        if not sparse or len(sparse) == len(self.tracked):
            return g
        self.sparse = sorted(sparse)
        self.untrack(sparse, "not tracked: mostly zero gradients (vsa_skip_sparse)", step)
        return Gathered(self.windows, self._sizes(), grads, inv_scale)

    def _correct(self, g, step, finite):
        """A CORRECT step: the prediction against the actual gradient, on the flat tensor, for the model
        and per tensor (segment sums over its blocks, chunk by chunk): while probing, its gain over the
        zero gradient (earned(), promote()); with full histories, the gate's cosines and trust factors."""
        sums = [None, None, None]  # per tensor (float64 [tensors]): <g, p>, |p|^2, |g|^2
        starts = g.starts

        def visit(c, a, p):  # chunk c compared: its part of the per-tensor sums (temporaries: a chunk's)
            for j, fn in enumerate((torch.mul, lambda _, p: p * p, lambda a, _: a * a)):
                x = self.windows.segment_sum(fn(a, p), start=starts[c])
                sums[j] = x if sums[j] is None else sums[j] + x

        cosine, rel, *_ = self.predictor.correct(g, step, finite=finite, visit=visit)
        self.cosine = cosine
        self.cosine_sum += torch.nan_to_num(cosine)
        self.corrections += 1
        ws = self.windows
        dot, p2, g2 = sums
        running = lambda x, old: torch.where(x.isfinite(), old + w * (x - old), old)  # noqa: E731
        # (a non-finite gradient, an fp16 overflow, measures nothing: the running means stay)
        if self.probing:
            w = 1.0 / min(self.corrections, _RUNNING)
            self.tensor_gain = running((2 * dot - p2) / g2.clamp_min(1e-30), self.tensor_gain)
            rel, *self.gain_host = torch.cat([rel.reshape(1).double(), self.tensor_gain]).tolist()  # host sync: once per CORRECT step
            if rel == rel:
                self.earn = (self.earn + [1.0 - rel * rel])[-WORTH_WINDOW:]
            return rel
        self.tensor_measured += 1
        w = 1.0 / min(self.tensor_measured, _RUNNING)
        tracked = ws.covered
        nan = torch.full_like(dot, math.nan)
        cos = torch.where(tracked, (dot / (g2.sqrt() * p2.sqrt()).clamp_min(1e-30)).clamp(-1.0, 1.0), nan)
        trust = torch.where(tracked, (dot / p2.clamp_min(1e-30)).clamp(0.0, 1.0), nan)
        self.tensor_cosine = running(cos, self.tensor_cosine)
        self.tensor_trust = running(trust, self.tensor_trust)
        n = len(self.params)
        values = torch.cat([rel.reshape(1).double(), self.tensor_cosine, self.tensor_trust,
                            torch.where(tracked, dot, nan), torch.where(tracked, g2, nan),
                            torch.where(tracked, p2, nan)])
        rel, *per = values.tolist()  # host sync: once per CORRECT step, for the decisions below
        self.refresh_mask(per[:2 * n])
        self._measure_admitted(*(per[(2 + j) * n:(3 + j) * n] for j in range(3)))
        self._retire(step)
        return rel

    def _measure_admitted(self, dots, a2, p2):
        """At a CORRECT step (host lists, per tensor; NaN for untracked ones): policy.admitted's figures of
        the predictions the gate admits, and their worth in the whole-step test's window."""
        self.admitted_cosine, self.admitted_energy, worth = admitted(self.predict_mask, dots, a2, p2)
        if worth == worth:
            self.worth = (self.worth + [worth])[-WORTH_WINDOW:]

    def _retire(self, step):
        """After a CORRECT step: a tracked tensor the gate has kept out at vsa_retire_after consecutive
        CORRECT steps stops being tracked (no record, no comparison, its blocks freed). Host lists only;
        every rank decides the same from the same synchronised gradients."""
        for i in self.tracked:
            self.closed[i] = 0 if self.predict_mask[i] else self.closed[i] + 1
        after = self.args.vsa_retire_after
        retired = [i for i in self.tracked if after and self.closed[i] >= after]
        if retired:
            self.untrack(retired, f"retired: prediction cosine below vsa_min_cosine at {after} CORRECT steps "
                                  "in a row", step)

    def refresh_mask(self, per=None):
        """Which tensors get their prediction and with what trust factor, from the running per-tensor
        cosines and trust factors (`per`: both host lists, concatenated)."""
        n = len(self.params)
        tracked = set(self.tracked)
        if self.probing or self.tensor_measured == 0:  # nothing measured per tensor: only an open gate admits
            self.predict_mask, self.trust = [self.gate_off and i in tracked for i in range(n)], [1.0] * n
        else:
            if per is None:  # host sync: only when state is loaded
                per = torch.cat([self.tensor_cosine, self.tensor_trust]).tolist()
            cos, self.trust = per[:n], per[n:]
            self.predict_mask = [i in tracked and (self.gate_off or c >= self.args.vsa_min_cosine)
                                 for i, c in enumerate(cos)]
        # the trust factors as the predictions read them (a host-to-device copy at CORRECT steps, no sync)
        self._trust = torch.tensor([t if t == t else 1.0 for t in self.trust]).to(self.params[0].device)

    # ---- PREDICT steps -------------------------------------------------------------------------
    def usable(self) -> bool:
        """A full history with a record to predict from (a probe measures and has none to give)."""
        return not self.probing and self.predictor.last_t >= 0

    def prediction(self, step, index, grad_scale=None):
        """{tensor: its predicted gradient} for the tensors in `index` (admitted ones), as views of one
        flat buffer per dtype: on the scale the Trainer expects (times the fp16 loss scale when there is
        one), times each tensor's trust factor with vsa_trust='fitted'."""
        if self.predictor.history is not None:  # written chunk by chunk into one flat buffer
            pred = torch.empty(self.windows.numel, device=self.params[0].device)
            self.predictor.predict(step, into=self._chunks(pred))
        else:
            pred = torch.cat(self.predictor.predict(step))
        if self.args.vsa_trust == "fitted":
            pred.mul_(self._trust[self.windows.segment])
        if grad_scale is not None:
            pred.mul_(grad_scale.float())
        flats = {}
        for dtype in {self.params[i].dtype for i in index}:
            flats[dtype] = self.windows.views(pred if dtype == pred.dtype else pred.to(dtype))
        return {i: flats[self.params[i].dtype][i] for i in index}

    # ---- statistics and state ------------------------------------------------------------------
    def state_memory_ratio(self) -> float:
        """Bytes of the history's tensors over the fp32 bytes of the model's trainable parameters."""
        state = sum(v.numel() * v.element_size() for k, v in self.predictor.state_dict().items()
                    if isinstance(v, torch.Tensor) and k != "skipped")  # (the non-finite count: 8 bytes)
        return state / (4 * sum(p.numel() for p in self.params))

    _TENSORS = ("cosine", "cosine_sum", "tensor_cosine", "tensor_trust", "tensor_gain", "skipped")
    _HOST = ("probing", "tracked", "sparse", "closed", "earn", "worth", "admitted_cosine", "admitted_energy",
             "corrections", "tensor_measured", "peak_state_ratio")

    def state_dict(self) -> dict:
        s = {k: getattr(self, k) for k in self._TENSORS + self._HOST}
        s["names"] = list(self.names)  # what the indices above and the flat layout refer to
        for key, value in self.predictor.state_dict().items():
            if key != "skipped":  # (the tracker's own count; chunk i's buffers as "predictor.codes.i")
                s[f"predictor.{key}"] = value
        return s

    def load_state_dict(self, state: dict):
        """Rebuilds the layout the state was saved with, then checks every key, shape and value."""
        expected = set(self._TENSORS + self._HOST) | {"names"}
        missing = sorted(expected - set(state))
        if missing:
            raise KeyError(f"tracker state misses {missing[:5]}")
        n = len(self.params)
        if state.get("names") != self.names:
            saved = state.get("names") or []
            diff = next((f"#{k}: saved {a!r}, now {b!r}" for k, (a, b) in enumerate(zip(saved, self.names)) if a != b),
                        f"saved {len(saved)} tensors, now {n}")
            raise ValueError(f"saved for other trainable parameters than this model's ({diff})")
        for key in ("tracked", "sparse", "closed"):
            v = state[key]
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError(f"{key} must be a list of ints, got {str(v)[:80]}")
        for key in ("tracked", "sparse"):
            v = state[key]
            if v != sorted(set(v)) or (v and (v[0] < 0 or v[-1] >= n)):
                raise ValueError(f"{key} must list distinct tensor indices in 0..{n - 1}, in order, got {str(v)[:80]}")
        if len(state["closed"]) != n or any(c < 0 for c in state["closed"]):
            raise ValueError(f"closed must list one count per predicted tensor ({n} ints >= 0), got "
                             f"{str(state['closed'])[:80]}")
        for key in ("earn", "worth"):
            v = state[key]
            if (not isinstance(v, list) or len(v) > WORTH_WINDOW
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise ValueError(f"{key} must list at most {WORTH_WINDOW} numbers, got {str(v)[:80]}")
        if bool(state["probing"]) != self.probing and state["probing"]:
            raise ValueError(f"saved while the predictor measured a sample of each tensor (vsa_probe_fraction="
                             f"{self.args.vsa_probe_fraction}), but this run has no probe (vsa_min_cosine=-1 "
                             "turns it off); resume with the saved vsa_min_cosine")
        self.probing, self.tracked, self.sparse = bool(state["probing"]), list(state["tracked"]), list(state["sparse"])
        self._build()
        for key in self._TENSORS:
            mine, v = getattr(self, key), state[key]
            if not isinstance(v, torch.Tensor) or v.shape != mine.shape or v.dtype != mine.dtype:
                raise ValueError(f"{key}: expected {tuple(mine.shape)} {mine.dtype}, got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            setattr(self, key, v.to(mine.device))
        wanted = {f"predictor.{k}" for k in self.predictor.state_dict() if k != "skipped"}  # (the saved layout's)
        given = {k for k in state if k.startswith("predictor.")}
        if wanted != given:
            raise KeyError(f"tracker state keys differ: missing {sorted(wanted - given)[:3]}, unexpected "
                           f"{sorted(given - wanted)[:3]}")
        pred = {k[len("predictor."):]: state[k] for k in wanted}
        self.predictor.skipped = self.skipped
        pred["skipped"] = self.skipped
        self.predictor.load_state_dict(pred)
        self.closed, self.earn, self.worth = list(state["closed"]), [float(x) for x in state["earn"]], [
            float(x) for x in state["worth"]]
        self.admitted_cosine, self.admitted_energy = float(state["admitted_cosine"]), float(state["admitted_energy"])
        self.corrections, self.tensor_measured = int(state["corrections"]), int(state["tensor_measured"])
        self.peak_state_ratio = float(state["peak_state_ratio"])
        self.gain_host = self.tensor_gain.tolist() if self.corrections else None  # host sync: once, at load
        self.refresh_mask()

