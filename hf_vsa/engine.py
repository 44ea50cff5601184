"""VSAEngine: ties the phase controller, the predictor and the run statistics to one model.

VSATrainer calls it at fixed points of each optimizer step; it never calls back into the Trainer.
Host syncs happen only where marked: once per CORRECT step (the prediction's measurements, for the
gate), once per run where the prediction earns a full history (vsa_skip_sparse), and at logging
steps. Every decision taken on WARMUP, FULL and PREDICT steps (micro-batches, drop rates, whole-step
PREDICT, the cycle's loss) reads device values posted a backprop step earlier (flat.Deferred), so
those steps never wait on the device; the ops they add do not grow with the number of tensors.
"""
import logging
import math

import torch

from .blocks import BlockDrop
from .compress import TernaryAccumulator, blocks_of
from .controller import WORTH_WINDOW, Phase, PhaseController, lower_bound, whole_step_pays
from .flat import Deferred
from .accumulation import MIN_MEASURED, AdaptiveAccumulation
from .noise import NoiseScale
from .predictor import GradientPredictor
from .probe import Probe
from .stats import engine_stats

logger = logging.getLogger(__name__)


class VSAEngine:
    def __init__(self, args, model, reduce_mean=None, world=1):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("VSATrainer: the model has no parameter with requires_grad=True")
        # Every trainable tensor is tracked and can be predicted (whole-step PREDICT predicts them all).
        # Partial backward: the last `exact` tensors (output end) get exact gradients on partial PREDICT
        # steps; only the ones before them are candidates for prediction there.
        exact = round(len(named) * args.vsa_exact_fraction)
        self.n_predicted = len(named) - exact
        if not self.n_predicted:
            raise ValueError("vsa_exact_fraction leaves no tensor to predict; lower it")
        self.exact = set(range(self.n_predicted, len(named)))
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # DropBP on partial PREDICT steps (blocks.py): blocks below the exact tensors skip their backward.
        self.dropbp = BlockDrop(model, self.params, self.exact, args.vsa_block_drop, args.vsa_adaptive_block_drop,
                                args.vsa_seed)
        self.computed = set()  # this PREDICT step: predicted tensors that get an exact gradient instead
        self.requires = [True] * len(self.params)  # their requires_grad before a partial step froze some
        # Host copy, refreshed at CORRECT steps only. Nothing is measured yet: only an open gate admits.
        self.predict_mask = [args.vsa_min_cosine <= -1.0] * len(self.params)
        self.trust = [1.0] * len(self.params)  # host copy of the trust factors, likewise
        self.closed = [0] * len(self.params)  # consecutive CORRECT steps at which the gate kept each tensor out
        self.args = args
        # Averages a device tensor over processes, so every rank takes the same decision.
        self.reduce_mean = reduce_mean or (lambda t: t)
        self.comm_bytes = 0  # gradient bytes hf_vsa all-reduced itself (partial PREDICT steps, DDP)
        self.controller = PhaseController(
            warmup_steps=args.vsa_warmup_steps, full_steps=args.vsa_full_steps,
            predict_steps=args.vsa_predict_steps, correct_every=args.vsa_correct_every,
            min_history=args.vsa_history_window, adaptive=args.vsa_adaptive_phases,
            loss_threshold=args.vsa_loss_threshold, residual_threshold=args.vsa_residual_threshold)
        # With the gate on, the predictor first tracks a sample of each tensor (probe.py); the tensors
        # still tracked after the first cycle's measurements get a full history (end_probe).
        self.probe = None
        if args.vsa_probe_fraction > 0 and args.vsa_min_cosine > -1.0:
            self.probe = Probe(self.params, args.vsa_probe_fraction, args.vsa_seed)
        self.earn = []  # on the probe's sample, at the last CORRECT steps: 1 - |g - p|^2 / |g|^2 (host floats)
        self.predictor = self._new_predictor(self.params if self.probe is None else self.probe.stand_ins)
        self.accumulator = None  # ternary gradient accumulation (gradient_accumulation_steps > 1)
        if args.vsa_ternary_accumulation and args.gradient_accumulation_steps > 1:
            self.accumulator = TernaryAccumulator(self.params, args.vsa_compression_block,
                                                  args.vsa_seed)
        self.micro_batch = 0  # micro-batches with a backward run so far in this optimizer step
        dev = self.params[0].device
        self._zero = torch.zeros(1, device=dev)  # stands in for a None gradient in per-tensor norms
        # Device values the decisions read a backprop step later (no host sync): the noise totals and the
        # blocks' drop rates (posted at every backprop step), the cycles' mean losses (at each cycle's end).
        self.mirror, self.cycle_mirror = Deferred(), Deferred()
        self.mirror_meta = []  # host values posted with each mirror slot: (noise measured, consistency measured)
        self.tensor_measured = 0  # CORRECT steps that measured the full predictor per tensor
        self.phase = None
        self.step = -1  # the optimizer step (Trainer's global_step) self.phase belongs to
        nan = float("nan")
        self.cosine = torch.full((), nan, dtype=torch.float64, device=dev)
        self.cosine_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.corrections = 0
        self.tensor_cosine = torch.zeros(len(self.params), dtype=torch.float64, device=dev)  # running mean
        self.tensor_trust = torch.zeros(len(self.params), dtype=torch.float64, device=dev)  # running mean
        self.tensor_gain = torch.zeros(len(self.params), dtype=torch.float64, device=dev)  # the probe's, running mean
        self.gain_host = None  # host copy of tensor_gain, read at CORRECT steps
        self.last_loss = torch.zeros((), device=dev)  # last measured micro-batch loss
        self.step_loss = None  # this step's measured micro-batch losses, summed
        self.cycle_loss, self.cycle_n = torch.zeros((), device=dev), 0
        self.log_loss, self.log_n = torch.zeros((), device=dev), 0
        self.seconds = {p.name: 0.0 for p in Phase}
        self.phases = []  # phase names of the steps run by this process (not checkpointed)
        self.whole_steps = []  # the steps of those that ran whole-step PREDICT (not checkpointed)
        # Largest state so far. No buffer exists before the first record, which allocates them
        # (after vsa_skip_sparse has dropped tensors); after it they only shrink (retired tensors).
        self.peak_state_ratio = 0.0
        # The gradient noise scale (noise.py) and the whole-step decision it feeds (decide_whole).
        self.noise = NoiseScale(self.params, args.gradient_accumulation_steps, world, args.per_device_train_batch_size,
                                dev, args.vsa_seed)
        self.whole = False  # PREDICT steps of this stretch run no forward and no backward at all
        self.admitted_cosine, self.admitted_energy = nan, 0.0  # at the last CORRECT step (host floats)
        self.worth = []  # energy * cosine of the admitted predictions at the last WORTH_WINDOW CORRECT steps
        self.kappa = nan  # the mean's share of the gradient at the last decision (host float)
        self.noise_estimate = (nan, nan, nan)  # (kappa, noise scale, batch over it) at the last refresh_noise
        self.forwards_skipped = 0  # steps with no forward since the last log (host int)
        # Adaptive accumulation: the micro-batches each step computes (accumulation.py).
        self.accum = args.gradient_accumulation_steps
        self.micro = AdaptiveAccumulation(self.accum, world, args.per_device_train_batch_size, args.vsa_tolerance,
                                          args.vsa_adaptive_accumulation)

    def close(self):
        """Let go of the model before another engine takes it (a new run, a reset on resume)."""
        self.dropbp.remove()

    def _new_predictor(self, tensors):
        a = self.args
        return GradientPredictor(
            tensors, kind=a.vsa_predictor, decay=a.vsa_history_decay, residual_decay=a.vsa_residual_decay,
            momentum=a.vsa_momentum, compression=a.vsa_compression, window=a.vsa_history_window,
            block=a.vsa_compression_block, rounding=a.vsa_ternary_rounding, bundle=a.vsa_bundle_size, seed=a.vsa_seed,
            order=a.vsa_ar_order, ridge=a.vsa_ar_ridge)

    def _within_budget(self):
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
            cost = per_element * blocks_of(self.params[i].numel(), block) * block  # (buffers hold whole blocks)
            if used + cost <= budget:
                chosen.append(i)
                used += cost
        return chosen

    def end_probe(self, log=True):
        """The prediction earned its place on the probe's sample (earned()): the tensors _within_budget()
        get a full history from now on, starting empty (vsa_skip_sparse drops the mostly-zero ones at its
        first record); the gate then measures each at the CORRECT steps that follow."""
        skipped = self.predictor.skipped
        self.probe = None
        self.predictor = self._new_predictor(self.params)
        self.predictor.skipped = skipped  # a run's count of refused records, not a history's
        self.predictor.set_active(self._within_budget())
        self.refresh_mask()
        promoted = self.predictor.active
        if log:
            logger.info("hf_vsa: step %d: probe done; %d of %d tensors tracked in full from now on: %s", self.step,
                        len(promoted), len(self.params), [self.names[i] for i in promoted])

    # ---- per optimizer step ----------------------------------------------------------------
    def begin_step(self, global_step: int) -> Phase:
        """Phase of optimizer step `global_step`; decided once, whatever the micro-batch."""
        if global_step != self.step:
            self.step = global_step
            self.micro_batch = 0
            self.micro.new_step()
            self.computed = set()
            self.phase = self.controller.next_phase(self._take_cycle_loss)
            if self.phase is Phase.PREDICT and self.controller.at_block_start:
                self.refresh_drop()
                self.decide_whole()
            elif self.phase is Phase.FULL and self.controller.at_block_start:
                self.refresh_noise()
            elif self.phase is Phase.WARMUP and self.micro.enabled:
                # Early in training the mean dominates the gradient (the noise scale grows as the loss
                # falls), so the micro-batches are decided from the second measured step on, not after
                # the predictor's warm-up: a batch ramp from measurement. At WARMUP steps only.
                self.refresh_noise()
            if self.phase is Phase.PREDICT and self.backed_off:
                # Neither a whole-step nor a partial PREDICT step pays, as measured: a backprop step,
                # recorded like a FULL one; the block's CORRECT steps go on measuring the predictions.
                self.phase = Phase.FULL
                self.controller.ran_as(Phase.FULL)
            self.phases.append(self.phase.name)
            self.noise.listening = self.phase.runs_backward
            if self.phase is Phase.PREDICT and self.whole:
                self.whole_steps.append(global_step)
            # The probe ends at the first FULL block after a CORRECT step has measured it, so the full
            # history fills during that block, before the next PREDICT block reads it (with no FULL
            # blocks, at the next PREDICT block: its CORRECT steps fill the history).
            c = self.controller
            if (self.probe is not None and c.at_block_start and c.block is not Phase.WARMUP
                    and (c.block is Phase.FULL or c.full == 0) and self.earned()):
                self.end_probe()
        return self.phase

    def earned(self) -> bool:
        """The prediction is measurably better than the zero gradient on the probe's sample: a lower
        confidence bound (controller.lower_bound) of 1 - |g - p|^2 / |g|^2 over the recent CORRECT
        steps is above 0. (E|g - p|^2 = |G - p|^2 + noise and E|g|^2 = |G|^2 + noise, with G the mean
        gradient: above 0 means p is closer to G than 0 is, the optimizer's coasting on its momentum.)"""
        bound = lower_bound(self.earn)
        return bound == bound and bound > 0

    def _take_cycle_loss(self) -> float:
        """The mean measured loss of the cycle before the one that just ended (NaN before two cycles): the
        loss of the one that ended is posted now and read at the next cycle's end, so no step waits for it."""
        mean = self.cycle_loss / self.cycle_n if self.cycle_n else torch.full_like(self.cycle_loss, math.nan)
        self.cycle_mirror.post(self.reduce_mean(mean))  # averaged over processes so all ranks agree
        self.cycle_loss = torch.zeros_like(self.cycle_loss)
        self.cycle_n = 0
        value = self.cycle_mirror.read()
        return math.nan if value is None else value[0]

    def note_loss(self, loss, last_micro_batch: bool, factor=1.0):
        """A measured (forward-pass) micro-batch loss, already scaled for accumulation. At the last
        micro-batch, `factor` makes the step's sum of them its mean (adaptive accumulation: the one the
        gradients were rescaled by, K / m or the step's items over the computed ones')."""
        loss = loss.detach()
        self.last_loss = loss
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss
        if last_micro_batch:
            total = self.step_loss * factor
            self.step_loss = None
            self.cycle_loss += total
            self.log_loss += total
            self.cycle_n += 1
            self.log_n += 1

    def _grads(self, inv_scale=None):
        """Every tracked tensor's gradient, zeros where it has none (per-tensor ops: the full predictor's)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if inv_scale is not None:
            grads = torch._foreach_mul(grads, inv_scale)
        return grads

    def _norm_grads(self):
        """The gradients as read for per-tensor norms: a one-element zero where there is none (no op)."""
        return [p.grad if p.grad is not None else self._zero for p in self.params]

    def first_micro_batch(self):
        """After the backward of a backprop step's first computed micro-batch, when more follow."""
        self.noise.first(self._norm_grads())

    def _post(self):
        """After a backprop step: the values the next decisions read, posted without a host sync (a
        collective under DDP: every rank posts at the same points)."""
        shares = self.dropbp.shares(self.noise)
        both = self.noise.totals() if shares is None else torch.cat([self.noise.totals(), shares])
        both = self.reduce_mean(both)
        drop = self.dropbp.rates(both[2:]) if shares is not None else both[2:]
        self.mirror.post(torch.cat([both[:2], drop]))
        self.mirror_meta = (self.mirror_meta + [(self.noise.measured, self.consistency.measured)])[-2:]

    def _read(self):
        """(values, (noise measured, consistency measured)) of the post before the latest, or None."""
        values = self.mirror.read()
        return None if values is None else (values, self.mirror_meta[0])

    def refresh_drop(self):
        """The blocks' drop probabilities for the PREDICT block that starts, from the posted rates."""
        got = self._read()
        measured = got is not None and (got[1][0] if self.noise.lag1 is None else got[1][1]) > 0
        self.dropbp.refresh(got[0][2:] if measured else None)

    def after_backward(self, grad_scale=None, micro_scale=1.0):
        """Last micro-batch of a backprop step: record the accumulated, synchronised gradient
        (`micro_scale`: the factor adaptive accumulation rescaled it by)."""
        if self.blocks:
            self.consistency.update(self.step)  # a cosine: the fp16 loss scale cancels out
        self.noise.listening = False
        # (a ratio of squared norms: the fp16 loss scale cancels out)
        self.noise.observe(self.step, self._norm_grads(), computed=self.micro.run, scale=micro_scale)
        self._post()
        history = self.predictor.history
        if history is not None and self.controller.records_before_read() >= history.window:
            # A ring of `window` records: this one would be pushed out before anything reads it
            # (the first WARMUP steps, or a FULL block longer than the window), so skip its cost.
            return
        inv_scale = None if grad_scale is None else 1.0 / grad_scale
        if self.probe is not None:  # one flat sample, gathered from .grad as one cat: a few ops in all
            grads = self.probe.sample([p.grad for p in self.params])
            if inv_scale is not None:
                grads[0].mul_(inv_scale)
            first = self.predictor.last_t < 0
            if self.phase is Phase.CORRECT:
                self._probe_correct(grads)
            else:
                self.predictor.record(grads, self.step)
            if first:  # the buffers were just allocated: the peak (host arithmetic, no sync)
                self.peak_state_ratio = max(self.peak_state_ratio, self.state_memory_ratio())
            return
        grads = self._grads(inv_scale)
        first = self.predictor.last_t < 0  # the first record of the full predictor
        if first and self.args.vsa_skip_sparse:
            self._drop_sparse(grads)
        if not self.predictor.active:  # every tensor dropped or retired: nothing to record or compare
            return
        if self.phase is Phase.CORRECT:
            cosine, rel_residual, per_tensor, trust, parts = self.predictor.correct(grads, self.step)
            self.cosine = cosine
            self.cosine_sum += torch.nan_to_num(cosine)
            self.corrections += 1
            self.tensor_measured += 1
            w = 1.0 / min(self.tensor_measured, 4)  # running mean over the last few corrections
            # (a non-finite gradient, an fp16 overflow, measures nothing: the running means stay)
            self.tensor_cosine = torch.where(per_tensor.isfinite(), self.tensor_cosine + w * (
                per_tensor - self.tensor_cosine), self.tensor_cosine)
            self.tensor_trust = torch.where(trust.isfinite(), self.tensor_trust + w * (trust - self.tensor_trust),
                                            self.tensor_trust)
            # host sync: once per CORRECT step (a backprop step), for the decisions below
            n = len(self.params)
            rel, *per = torch.cat([rel_residual.reshape(1), self.tensor_cosine, self.tensor_trust,
                                   parts.reshape(-1)]).tolist()
            dots, a2, p2 = (per[(2 + j) * n:(3 + j) * n] for j in range(3))
            per = per[:2 * n]
            self.controller.report_residual(rel)
            self.refresh_mask(per)
            self._measure_admitted(dots, a2, p2)
            self._retire()
            self.decide_whole()
        else:
            self.predictor.record(grads, self.step)
            if first:  # the buffers were just allocated: the peak (host arithmetic, no sync)
                self.peak_state_ratio = max(self.peak_state_ratio, self.state_memory_ratio())

    def _probe_correct(self, grads):
        """A CORRECT step while the probe measures: the prediction against the zero gradient, on the sample,
        for the model (earned()) and per tensor (a segment sum over its windows: which tensors a full
        history would serve, see end_probe)."""
        g, p = grads[0], self.predictor.predict(self.step)[0]  # (the prediction correct() compares, below)
        cosine, rel, *_ = self.predictor.correct(grads, self.step)
        self.cosine = cosine
        self.cosine_sum += torch.nan_to_num(cosine)
        self.corrections += 1
        dot, p2, g2 = self.probe.windows.segment_sum(torch.stack([g * p, p * p, g * g]))
        gain = (2 * dot - p2) / g2.clamp_min(1e-30)
        w = 1.0 / min(self.corrections, 4)  # running mean over the last few corrections
        # (a non-finite gradient, an fp16 overflow, measures nothing: the running means stay)
        self.tensor_gain = torch.where(gain.isfinite(), self.tensor_gain + w * (gain - self.tensor_gain),
                                       self.tensor_gain)
        rel, *self.gain_host = torch.cat([rel.reshape(1).double(), self.tensor_gain]).tolist()  # host sync: once per CORRECT step
        self.controller.report_residual(rel)
        if rel == rel:
            self.earn = (self.earn + [1.0 - rel * rel])[-WORTH_WINDOW:]

    def _measure_admitted(self, dots, a2, p2):
        """At a CORRECT step (host lists, per tensor; NaN for untracked ones): the cosine with the
        actual gradient of the predictions the gate admits, and their share of its energy."""
        ok = lambda x: x == x  # noqa: E731 (not NaN)
        adm = [i for i, keep in enumerate(self.predict_mask) if keep and ok(dots[i])]
        total = sum(x for x in a2 if ok(x))
        d, a, p = (sum(x[i] for i in adm) for x in (dots, a2, p2))
        self.admitted_cosine = d / math.sqrt(a * p) if a > 0 and p > 0 else math.nan
        self.admitted_energy = a / total if total > 0 else 0.0
        # (nothing admitted: worth 0, a measurement too)
        worth = self.admitted_energy * self.admitted_cosine if adm else 0.0
        if worth == worth:
            self.worth = (self.worth + [worth])[-WORTH_WINDOW:]

    def refresh_noise(self, decide=True):
        """The noise estimate (kappa, noise scale, batch over it) into host values; with `decide`, also
        the micro-batches adaptive accumulation computes from now on (at block starts and CORRECT
        steps, and at each WARMUP step once the noise scale is measured), from the values posted a
        backprop step earlier: no host sync, the same on every rank. Without `decide` (logging steps),
        the current estimate: a host sync and under DDP a collective, so logging never changes training."""
        if not decide:
            self.noise_estimate = self.noise.estimate(self.reduce_mean)
            self.kappa = self.noise_estimate[0]
            return
        got = self._read()
        measured = 0 if got is None else got[1][0]
        self.noise_estimate = self.noise.from_totals(got[0][:2] if measured else None)
        self.kappa = self.noise_estimate[0]
        if measured >= MIN_MEASURED:
            self.micro.decide(self.noise_estimate[1])

    def decide_whole(self):
        """Whole-step PREDICT for the steps that follow, or the partial backward: from measurements
        only (controller.whole_step_pays): the admitted predictions are worth enough of a backward, by a
        lower confidence bound over the recent CORRECT steps, that the predicted steps cost at most
        vsa_tolerance more optimizer steps.
        Host sync (the noise estimate): at the start of a PREDICT block and at CORRECT steps."""
        self.refresh_noise()
        # Only with kappa from two batch sizes (noise.py): with one gradient per step it is read from the
        # lag-1 cosine, which the mean's own drift between steps lowers, and a kappa read low inflates v.
        self.whole = bool(self.args.vsa_whole_step and self.probe is None and self.tensor_measured
                          and self.noise.lag1 is None
                          and whole_step_pays(self.worth, self.kappa, self.controller.predict_share,
                                              self.args.vsa_tolerance))

    def _drop_sparse(self, grads):
        """Before the full predictor's first record (once per run, where the prediction earned it): tensors whose gradient is mostly exact zeros (embedding rows of
        tokens absent from the batch) are never predicted nor recorded; they change on backprop
        steps only. Their prediction would move rows the batch never touched."""
        zeros = torch.stack([(g == 0).sum().float() / g.numel() for g in grads])
        zeros = zeros.tolist()  # host sync: once per run, at the full predictor's first record
        sparse = [i for i, z in enumerate(zeros) if z >= 0.5]
        if sparse and len(sparse) < len(zeros):
            self._untrack(sparse, "not tracked: mostly zero gradients (vsa_skip_sparse)")

    def _retire(self):
        """After a CORRECT step: a tracked tensor the gate has kept out at vsa_retire_after
        consecutive CORRECT steps stops being tracked (no record, no comparison, buffers freed).
        Host lists only; every rank decides the same from the same synchronised gradients."""
        for i in self.predictor.active:
            self.closed[i] = 0 if self.predict_mask[i] else self.closed[i] + 1
        after = self.args.vsa_retire_after
        retired = [i for i in self.predictor.active if after and self.closed[i] >= after]
        if retired:
            self._untrack(retired, f"retired: prediction cosine below vsa_min_cosine at {after} CORRECT steps in a row")

    def _untrack(self, indices, why):
        """Stop predicting and recording these tensors and free their buffers (no way back)."""
        self.predictor.set_active(sorted(set(self.predictor.active) - set(indices)))
        for i in indices:
            self.predict_mask[i] = False
        logger.info("hf_vsa: step %d: %d tensors %s; %d of %d still tracked: %s", self.step, len(indices), why,
                    len(self.predictor.active), len(self.params), [self.names[i] for i in indices])

    def write_prediction(self, grad_scale=None):
        """Last micro-batch of a PREDICT step: the predicted gradient goes into .grad, on the
        scale the Trainer expects (times the fp16 loss scale when there is one). Tensors whose
        prediction is not trusted get no gradient, hence no update, this step."""
        mode = self.args.vsa_predict_mode
        if mode != "predict":  # the controls: a zero gradient (coast on the optimizer's momentum), or none
            for i, p in enumerate(self.params):
                if i in self.computed or not p.requires_grad:
                    continue
                if mode == "skip":
                    p.grad = None
                elif p.grad is None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
            return
        # A probe measures and has no full prediction to give; a full history with no record yet
        # (it just started) has nothing to predict from: no update from either.
        usable = self.probe is None and self.predictor.last_t >= 0
        index = []
        for i, keep in enumerate(self.predict_mask):
            if i in self.computed:  # its block ran its backward: the exact gradient stays
                continue
            if keep and usable and self.params[i].requires_grad:  # a tensor the user froze gets nothing
                index.append(i)
            else:
                self.params[i].grad = None
        if not index:
            return
        pred = self.predictor.predict(self.step, index)
        if self.args.vsa_trust == "fitted":
            torch._foreach_mul_(pred, [self.trust[i] for i in index])
        if grad_scale is not None:
            torch._foreach_mul_(pred, grad_scale.float())
        for i, g in zip(index, pred):
            p = self.params[i]
            g = g.to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    def refresh_mask(self, per=None):
        """Which tensors get their prediction and with what trust factor, from the running
        per-tensor cosines and trust factors (`per`: both lists, concatenated)."""
        n = len(self.params)
        active = set(self.predictor.active)
        gate_off = self.args.vsa_min_cosine <= -1.0
        if self.probe is not None or self.tensor_measured == 0:  # nothing measured per tensor: only an open gate admits
            self.predict_mask, self.trust = [gate_off and i in active for i in range(n)], [1.0] * n
            return
        if per is None:  # host sync: only when state is loaded
            per = torch.cat([self.tensor_cosine, self.tensor_trust]).tolist()
        tensor_cos, self.trust = per[:n], per[n:]
        self.predict_mask = [i in active and (gate_off or c >= self.args.vsa_min_cosine)
                             for i, c in enumerate(tensor_cos)]

    # DropBP's state, as the checkpoint, the statistics and the scripts read it
    blocks = property(lambda self: self.dropbp.blocks)
    block_tensors = property(lambda self: self.dropbp.block_tensors)
    group_sizes = property(lambda self: self.dropbp.group_sizes)
    consistency = property(lambda self: self.dropbp.consistency)
    drop = property(lambda self: self.dropbp.drop, lambda self, v: setattr(self.dropbp, "drop", v))

    # rank-local state saved with the checkpoint (checkpoint.RANK_LOCAL)
    noise_g2 = property(lambda self: self.noise.g2, lambda self, v: setattr(self.noise, "g2", v))
    noise_trace = property(lambda self: self.noise.trace, lambda self, v: setattr(self.noise, "trace", v))

    @property
    def backed_off(self) -> bool:
        """This PREDICT stretch runs backprop steps: not whole-step, and either the measured drop
        probabilities (vsa_adaptive_block_drop) skip no block, so a partial step would cost the
        predicted tensors' updates and save no backward, or the model has no block DropBP can skip
        (a CNN, a mixed layer list) and no prediction is admitted, so a partial step would freeze every
        tensor below the exact ones and give them nothing (vsa_block_drop=1 asks for that: not then)."""
        if self.whole:
            return False
        no_blocks = not self.dropbp.blocks and self.dropbp.base < 1.0
        return self.dropbp.skips_none or (no_blocks and not any(self.predict_mask))

    @property
    def partial(self) -> bool:
        """This PREDICT stretch runs the partial backward (configured, not decided whole-step, not backed off)."""
        return bool(self.exact) and not self.whole and not self.backed_off

    def freeze_predicted(self, frozen: bool):
        """Partial backward. Without droppable blocks, the predicted tensors are frozen and autograd
        stops below the exact ones. With them (DropBP), only the tensors of the blocks this step
        skips are frozen (block k skipped with probability self.drop[k], drawn from (vsa_seed,
        step): the same on every rank, micro-batch and resume); a skipped block passes the gradient
        down unchanged, so the kept blocks and the tensors outside blocks (embeddings; not those
        vsa_skip_sparse dropped) get theirs."""
        if self.dropbp.skip is not None:
            self.dropbp.skip.reset()
        if frozen:
            self.computed = set(self.exact)
        if frozen and self.blocks:
            skipped = self.dropbp.draw(self.step)
            self.computed = (set(range(len(self.params))) - skipped - self._sparse()) | self.exact
        for i, p in enumerate(self.params):
            if frozen:  # (a callback may have frozen some since the engine was built: they stay frozen)
                self.requires[i] = p.requires_grad
            p.requires_grad_(self.requires[i] and (not frozen or i in self.computed))

    def _sparse(self):
        """Tensors vsa_skip_sparse dropped: they change on backprop steps only, also under DropBP.
        (Untracked but never gated: retired tensors were kept out by the gate, closed >= 1.)"""
        active = set(self.predictor.active)
        return {i for i in range(len(self.params)) if i not in active and self.closed[i] == 0}

    def exact_grads(self):
        """The gradients a partial PREDICT step computed: the exact tensors' and the kept blocks'. One that
        is None here (a tensor this rank's batch did not reach) is zero-filled, so every rank all-reduces
        the same tensors (a different flat size would hang the collective)."""
        out = []
        for i in sorted(self.computed):
            p = self.params[i]
            if p.grad is None and self.requires[i]:
                p.grad = torch.zeros_like(p)
            if p.grad is not None:
                out.append(p.grad)
        return out

    def add_time(self, seconds: float):
        if self.phase is not None:
            self.seconds[self.phase.name] += seconds

    # ---- statistics ------------------------------------------------------------------------
    def stats(self, timing=True) -> dict:
        """Plain numbers for logs and the model card (stats.py; host syncs: call at logging steps only).
        timing=False leaves out what comes from wall time (logs are a function of the run's state)."""
        return engine_stats(self, timing)

    def state_memory_ratio(self) -> float:
        """Bytes of all VSA state tensors over the fp32 bytes of the model's trainable parameters."""
        state = sum(v.numel() * v.element_size() for k, v in self.predictor.state_dict().items()
                    if isinstance(v, torch.Tensor) and k != "skipped")  # (the non-finite count: 8 bytes)
        trainable = 4 * sum(p.numel() for p in self.params)
        return state / trainable

    def take_measured_loss(self):
        """Mean loss of the optimizer steps whose forward ran since the last call (device tensor);
        with none, the last measured step's loss (the count, 0, says so)."""
        n = self.log_n
        value = self.log_loss / n if n else self.last_loss * self.args.gradient_accumulation_steps
        self.log_loss = torch.zeros_like(self.log_loss)
        self.log_n = 0
        return value, n
