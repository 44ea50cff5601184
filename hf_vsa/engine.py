"""VSAEngine: ties the phase controller, the predictor and the run statistics to one model.

VSATrainer calls it at fixed points of each optimizer step; it never calls back into the Trainer.
Host syncs happen only where marked: once per CORRECT step (the prediction's measurements, for the
gate: tracking.py), once per run where the prediction earns a full history (vsa_skip_sparse), and at
logging steps. Every decision taken on WARMUP, FULL and PREDICT steps (micro-batches, drop rates, whole-step
PREDICT, the cycle's loss) reads device values posted a backprop step earlier (flat.Deferred), so
those steps never wait on the device; the ops they add do not grow with the number of tensors.
"""
import logging
import math

import torch

from .blocks import BlockDrop
from .controller import Phase, PhaseController
from .policy import whole_step_pays
from .flat import Deferred
from .accumulation import MIN_MEASURED, AdaptiveAccumulation, TernaryAccumulator
from .noise import NoiseScale
from .stats import engine_stats
from .tracking import Tracker

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
        self.args = args
        # Averages a device tensor over processes, so every rank takes the same decision.
        self.reduce_mean = reduce_mean or (lambda t: t)
        self.comm_bytes = 0  # gradient bytes hf_vsa all-reduced itself (partial PREDICT steps, DDP)
        self.controller = PhaseController(
            warmup_steps=args.vsa_warmup_steps, full_steps=args.vsa_full_steps,
            predict_steps=args.vsa_predict_steps, correct_every=args.vsa_correct_every,
            min_history=args.vsa_history_window, adaptive=args.vsa_adaptive_phases,
            loss_threshold=args.vsa_loss_threshold, residual_threshold=args.vsa_residual_threshold)
        # What the prediction tracks (the probe's sample, then full histories where it earns them), the
        # predictor, and the gate's measurements (tracking.py).
        self.tracker = Tracker(args, self.params, self.names)
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
        self.phase = None
        self.step = -1  # the optimizer step (Trainer's global_step) self.phase belongs to
        nan = float("nan")
        self.last_loss = torch.zeros((), device=dev)  # last measured micro-batch loss
        self.step_loss = None  # this step's measured micro-batch losses, summed
        self.cycle_loss, self.cycle_n = torch.zeros((), device=dev), 0
        self.log_loss, self.log_n = torch.zeros((), device=dev), 0
        self.seconds = {p.name: 0.0 for p in Phase}
        self.phases = []  # phase names of the steps run by this process (not checkpointed)
        self.whole_steps = []  # the steps of those that ran whole-step PREDICT (not checkpointed)
        # The gradient noise scale (noise.py) and the whole-step decision it feeds (decide_whole).
        self.noise = NoiseScale(self.params, args.gradient_accumulation_steps, world, args.per_device_train_batch_size,
                                dev, args.vsa_seed)
        self.whole = False  # PREDICT steps of this stretch run no forward and no backward at all
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
            if (self.tracker.probing and c.at_block_start and c.block is not Phase.WARMUP
                    and (c.block is Phase.FULL or c.full == 0) and self.tracker.earned()):
                self.tracker.promote(self.step)
        return self.phase

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
        history = self.tracker.history
        if history is not None and self.controller.records_before_read() >= history.window:
            # A ring of `window` records: this one would be pushed out before anything reads it
            # (the first WARMUP steps, or a FULL block longer than the window), so skip its cost.
            return
        inv_scale = None if grad_scale is None else 1.0 / grad_scale
        correct, probing = self.phase is Phase.CORRECT, self.tracker.probing
        rel = self.tracker.observe([p.grad for p in self.params], self.step, correct, inv_scale)
        if rel is not None:
            self.controller.report_residual(rel)
            if not probing:  # the gate has measured full histories: whole-step PREDICT may pay
                self.decide_whole()

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
        only (policy.whole_step_pays): the admitted predictions are worth enough of a backward, by a
        lower confidence bound over the recent CORRECT steps, that the predicted steps cost at most
        vsa_tolerance more optimizer steps.
        Host sync (the noise estimate): at the start of a PREDICT block and at CORRECT steps."""
        self.refresh_noise()
        # Only with kappa from two batch sizes (noise.py): with one gradient per step it is read from the
        # lag-1 cosine, which the mean's own drift between steps lowers, and a kappa read low inflates v.
        t = self.tracker
        self.whole = bool(self.args.vsa_whole_step and not t.probing and t.tensor_measured
                          and self.noise.lag1 is None
                          and whole_step_pays(t.worth, self.kappa, self.controller.predict_share,
                                              self.args.vsa_tolerance))

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
        t = self.tracker
        usable = t.usable()
        index = []
        for i, keep in enumerate(t.predict_mask):
            if i in self.computed:  # its block ran its backward: the exact gradient stays
                continue
            if keep and usable and self.params[i].requires_grad:  # a tensor the user froze gets nothing
                index.append(i)
            else:
                self.params[i].grad = None
        if not index:
            return
        for i, g in t.prediction(self.step, index, grad_scale).items():  # views of one buffer: no op each
            p = self.params[i]
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

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
        """This PREDICT stretch runs backprop steps: not whole-step, and either a partial backward is
        configured (vsa_exact_fraction > 0) with vsa_block_drop 0 (the default: it skips no block), or
        the drop probabilities (measured: vsa_adaptive_block_drop) skip no block, so a partial step would
        cost the predicted tensors' updates and save no backward, or the model has no block DropBP can
        skip (a CNN, a mixed layer list) and no prediction is admitted, so a partial step would freeze
        every tensor below the exact ones and give them nothing (vsa_block_drop=1 asks for that: not then)."""
        if self.whole:
            return False
        base = self.dropbp.base
        no_blocks = not self.dropbp.blocks and base < 1.0
        return ((bool(self.exact) and base == 0) or self.dropbp.skips_none
                or (no_blocks and not any(self.tracker.predict_mask)))

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
            # (the tensors vsa_skip_sparse left out change on backprop steps only, also under DropBP)
            self.computed = (set(range(len(self.params))) - skipped - set(self.tracker.sparse)) | self.exact
        for i, p in enumerate(self.params):
            if frozen:  # (a callback may have frozen some since the engine was built: they stay frozen)
                self.requires[i] = p.requires_grad
            p.requires_grad_(self.requires[i] and (not frozen or i in self.computed))

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

    def take_measured_loss(self):
        """Mean loss of the optimizer steps whose forward ran since the last call (device tensor);
        with none, the last measured step's loss (the count, 0, says so)."""
        n = self.log_n
        value = self.log_loss / n if n else self.last_loss * self.args.gradient_accumulation_steps
        self.log_loss = torch.zeros_like(self.log_loss)
        self.log_n = 0
        return value, n
