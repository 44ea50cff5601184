"""PhaseController: one phase decision per optimizer step. Pure Python, no tensors.

WARMUP -> FULL (n) -> PREDICT (m, every k-th a CORRECT) -> FULL -> ...
WARMUP/FULL/CORRECT steps run backprop and record the gradient; PREDICT steps do not.
"""
import math
from enum import IntEnum


class Phase(IntEnum):
    WARMUP = 0
    FULL = 1
    PREDICT = 2
    CORRECT = 3

    @property
    def runs_backward(self) -> bool:
        return self is not Phase.PREDICT


class PhaseController:
    """Adaptive bounds: FULL in [full_steps, 4*full_steps], PREDICT in [1, predict_steps].

    A cycle is FULL + PREDICT. At the end of each cycle the caller may report the mean training
    loss of that cycle: a relative rise above `loss_threshold` over the previous cycle doubles
    FULL and halves PREDICT (backs off); two falls in a row shorten FULL by one step and lengthen
    PREDICT by `correct_every` steps, back towards the configured lengths and never past them.
    A falling loss is no evidence that skipping backward passes is harmless: training from scratch,
    the loss falls all along while the gap to backprop grows with every step it skips (measured in
    the README), so the configured schedule is the most a run ever skips.
    At a CORRECT step the caller may report the relative residual
    |actual - predicted| / |actual|: above `residual_threshold` times its running mean, the next
    CORRECT comes after half the interval (early correction).
    """

    def __init__(self, warmup_steps=10, full_steps=5, predict_steps=20, correct_every=5,
                 min_history=2, adaptive=True, loss_threshold=0.1, residual_threshold=1.5):
        self.base_full, self.base_predict, self.correct_every = full_steps, predict_steps, correct_every
        self.adaptive, self.loss_threshold, self.residual_threshold = adaptive, loss_threshold, residual_threshold
        self.full_max = max(1, 4 * full_steps)
        # Mutable state: everything below is in state_dict().
        self.step = 0
        self.full, self.predict = full_steps, predict_steps
        self.block = Phase.WARMUP
        self.left = max(warmup_steps, min_history)
        self.since_correct = 0
        self.interval = correct_every
        self.prev_loss = math.nan
        self.falls = 0
        self.residual_mean = math.nan
        self.corrections = 0
        self.counts = {p.name: 0 for p in Phase}
        self.last = None

    def _enter(self, block):
        self.block = block
        self.left = self.full if block is Phase.FULL else self.predict
        self.since_correct = 0

    def next_phase(self, cycle_loss=None) -> Phase:
        """Decide the phase of the next optimizer step. `cycle_loss` is a callable giving the
        mean measured loss of the cycle that just ended; it is called only at a cycle's end."""
        while self.left == 0:
            if self.block is Phase.PREDICT:
                if self.adaptive and cycle_loss is not None:
                    self._adapt(cycle_loss())
                self._enter(Phase.FULL)
            elif self.block is Phase.FULL or self.predict == 0:
                self._enter(Phase.PREDICT if self.predict > 0 else Phase.FULL)
            else:  # WARMUP done
                self._enter(Phase.FULL)
            if self.full == 0 and self.predict == 0:
                raise RuntimeError("PhaseController has no steps to schedule")
        self.left -= 1
        phase = self.block
        if phase is Phase.PREDICT:
            self.since_correct += 1
            # No CORRECT on the last PREDICT step: a FULL step follows anyway.
            if self.since_correct >= self.interval and self.left > 0:
                phase = Phase.CORRECT
                self.since_correct = 0
                self.interval = self.correct_every
        self.step += 1
        self.counts[phase.name] += 1
        self.last = phase
        return phase

    def ran_as(self, phase: Phase):
        """The step just decided ran as `phase` instead (a PREDICT step the engine backed off to a
        backprop step, see VSAEngine.backed_off): counted as such. The schedule is unchanged."""
        self.counts[self.last.name] -= 1
        self.counts[phase.name] += 1
        self.last = phase

    def _adapt(self, loss):
        if not math.isfinite(loss):
            return
        if math.isfinite(self.prev_loss) and self.prev_loss != 0:
            rel = (loss - self.prev_loss) / abs(self.prev_loss)
            if rel > self.loss_threshold:
                self.full = min(self.full_max, max(1, 2 * self.full))
                self.predict = max(1, self.predict // 2)
                self.falls = 0
            elif rel < 0:
                self.falls += 1
                if self.falls >= 2:
                    self.full = max(self.base_full, self.full - 1)
                    self.predict = min(self.base_predict, self.predict + self.correct_every)
                    self.falls = 0
            else:
                self.falls = 0
        self.prev_loss = loss

    def report_residual(self, rel_residual: float):
        """Relative residual measured at a CORRECT step; may schedule an early CORRECT."""
        if not math.isfinite(rel_residual):
            return
        if self.corrections > 0 and rel_residual > self.residual_threshold * self.residual_mean:
            self.interval = max(1, math.ceil(self.correct_every / 2))
        self.corrections += 1
        if math.isnan(self.residual_mean):
            self.residual_mean = rel_residual
        else:
            self.residual_mean += (rel_residual - self.residual_mean) / min(self.corrections, 10)

    def records_before_read(self) -> float:
        """After a backprop step: how many more backprop steps come before the predictor is next
        read (the next PREDICT block). Known from the schedule alone: FULL lengths change only at
        the end of a PREDICT block."""
        if self.block is Phase.WARMUP:
            return self.left + self.full if self.predict > 0 else math.inf
        if self.block is Phase.FULL:
            return self.left if self.predict > 0 else math.inf
        return 0

    @property
    def at_block_start(self) -> bool:
        """The step just decided is the first of its FULL or PREDICT block."""
        return self.left == (self.full if self.block is Phase.FULL else self.predict) - 1

    @property
    def predict_share(self) -> float:
        """The share of the current schedule's steps that are PREDICT (CORRECT steps excluded)."""
        m = self.predict
        if m <= 0:
            return 0.0
        corrections = (m - 1) // self.correct_every  # none on the last PREDICT step
        return (m - corrections) / (self.full + m)

    @property
    def backward_steps(self) -> int:
        return self.step - self.counts["PREDICT"]

    _STATE = ("step", "full", "predict", "left", "since_correct", "interval", "prev_loss", "falls",
              "residual_mean", "corrections")

    def state_dict(self) -> dict:
        s = {k: getattr(self, k) for k in self._STATE}
        s["block"] = int(self.block)
        s["last"] = -1 if self.last is None else int(self.last)
        s.update({f"count_{k}": v for k, v in self.counts.items()})
        return s

    def load_state_dict(self, state: dict):
        missing = [k for k in (*self._STATE, "block", "last") if k not in state]
        if missing:
            raise KeyError(f"PhaseController state is missing {missing}")
        for k in self._STATE:
            cur = getattr(self, k)
            setattr(self, k, type(cur)(state[k]) if not isinstance(cur, float) else float(state[k]))
        self.block = Phase(int(state["block"]))
        self.last = None if int(state["last"]) < 0 else Phase(int(state["last"]))
        self.counts = {p.name: int(state.get(f"count_{p.name}", 0)) for p in Phase}
