"""VSAMixin: the VSA method for any transformers.Trainer subclass that keeps the Trainer's
training_step contract; VSATrainer = VSAMixin + Trainer (trl.py: VSASFTTrainer = VSAMixin +
trl.SFTTrainer). A pair for another trainer:

    class MyVSATrainer(VSAMixin, OtherTrainer): pass
    @dataclass
    class MyVSAConfig(VSAArguments, OtherConfig): pass

Only the hooks that need it are overridden; the method itself lives in engine.py,
controller.py and predictor.py. Clipping, the optimizer and the LR scheduler are the
Trainer's own and run unchanged on PREDICT steps, reading the predicted .grad.
"""
import contextlib
import logging
import os
import shutil
import time

import torch
from transformers import Trainer
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import get_last_checkpoint

from .card import TAGS, add_vsa_section
from .checkpoint import load_engine, rank_local, save_engine
from .config import DEEPSPEED_REFUSAL, FSDP_REFUSAL, VSAArguments, VSATrainingArguments
from .controller import Phase
from .engine import VSAEngine

logger = logging.getLogger(__name__)


class _VSACallbackHandler(CallbackHandler):
    """The Trainer's callback handler, which also drives hf_vsa's engine at the events it needs, so the
    callback list (`trainer.callback_handler.callbacks`) is the one the user built: a new engine for
    every training loop, and the wall time of each optimizer step (data, forward, backward or
    prediction, optimizer) by phase; evaluation, logging and saving fall outside step begin..end."""

    def call_event(self, event, args, state, control, **kwargs):
        trainer = self.vsa_trainer
        if event == "on_train_begin":
            # Each training loop is a new run for the Trainer: every train() call, and every retry of
            # auto_find_batch_size after an out-of-memory error. Its step count restarts (from 0 or the
            # checkpoint's) and, with model_init (hyperparameter_search), the model is a new one. So the
            # engine is new too: built at the first step, for that model, from the checkpoint if any.
            trainer._vsa_drop_engine()
        elif event == "on_step_begin":
            trainer._vsa_t0 = time.perf_counter()
        elif event == "on_step_end" and trainer._vsa_t0 is not None:
            if trainer.vsa is not None:
                trainer.vsa.add_time(time.perf_counter() - trainer._vsa_t0)
            trainer._vsa_t0 = None
        return super().call_event(event, args, state, control, **kwargs)


class VSAMixin:
    """Mix in before a Trainer subclass; its arguments must include VSAArguments."""

    # The arguments built where none are given, as the Trainer builds TrainingArguments (a subclass's pair
    # sets its own config class).
    vsa_args_class = None

    def __init__(self, model=None, args=None, *rest, **kwargs):
        if args is None and self.vsa_args_class is not None:
            args = self.vsa_args_class(output_dir="trainer_output")
            logger.info("No `VSATrainingArguments` passed, using `output_dir=trainer_output`.")
        super().__init__(model, args, *rest, **kwargs)
        if not isinstance(self.args, VSAArguments):
            raise TypeError(f"{type(self).__name__} needs arguments with the vsa_* fields (VSATrainingArguments, "
                            f"VSASFTConfig, or your config mixing in hf_vsa.VSAArguments), got {type(self.args).__name__}")
        if self.args.vsa_enabled and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            # set up by the accelerate configuration, not by the arguments (which refuse fsdp= and deepspeed=)
            which = "FSDP" if self.is_fsdp_enabled else "DeepSpeed"
            raise ValueError(f"{which} (from the accelerate configuration: accelerate launch --use_fsdp / "
                             f"--use_deepspeed, or ACCELERATE_USE_* variables) "
                             f"{FSDP_REFUSAL if self.is_fsdp_enabled else DEEPSPEED_REFUSAL}")
        if self.args.vsa_enabled and self.args.n_gpu > 1:
            # DataParallel runs the blocks' replicas in threads, which would share DropBP's hook state.
            raise ValueError(
                f"VSATrainer does not support torch.nn.DataParallel, which the Trainer uses when one process "
                f"sees several GPUs (n_gpu={self.args.n_gpu}). Launch one process per GPU (DDP: accelerate "
                "launch --multi_gpu, or torchrun), make one GPU visible (CUDA_VISIBLE_DEVICES=0), or set "
                "vsa_enabled=False.")
        self.vsa = None
        self._vsa_resume_dir = None
        self._vsa_t0 = None
        if self.args.vsa_enabled:  # (the handler keeps its callbacks: only call_event is added)
            self.callback_handler.__class__ = _VSACallbackHandler
            self.callback_handler.vsa_trainer = self

    # ---- the method ------------------------------------------------------------------------
    def _vsa_engine(self) -> VSAEngine:
        if self.vsa is None:
            self.vsa = VSAEngine(self.args, self.model, reduce_mean=self._vsa_reduce_mean,
                                 world=self._vsa_world_size())
            if self._vsa_resume_dir is not None:
                self._vsa_load(self._vsa_resume_dir)
        return self.vsa

    def _vsa_grad_scale(self):
        """The fp16 GradScaler's scale as a device tensor (no host sync), or None."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)
        return scale if isinstance(scale, torch.Tensor) else torch.tensor(scaler.get_scale())

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.vsa_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        engine = self._vsa_engine()
        phase = engine.begin_step(self.state.global_step)
        last = self.accelerator.sync_gradients  # last micro-batch of this optimizer step
        computes = phase.runs_backward or engine.partial
        if computes and not engine.micro.take(last):
            # Adaptive accumulation: the measured noise scale says this micro-batch adds nothing the
            # step needs: no forward, no backward (the Trainer's running loss gets the last measured
            # one; logs report the measured mean instead, see log()).
            engine.forwards_skipped += 1
            return engine.last_loss
        if computes and num_items_in_batch is not None and engine.micro.target < engine.micro.accum:
            # The Trainer scales each micro-batch's loss by the items (label tokens) of all the step's
            # micro-batches; the computed ones' sum is rescaled by the items they hold (the Trainer's count)
            engine.micro.count(self._get_num_items_in_batch([inputs], self.args.device))
        if phase.runs_backward:
            loss = self._vsa_backprop(model, inputs, num_items_in_batch, last)
            scale = engine.micro.rescale(engine.params, self.current_gradient_accumulation_steps,
                                         num_items_in_batch) if last else 1.0
            engine.note_loss(loss, last, scale)
            if not last and engine.micro.run == 1:  # .grad holds one micro-batch's gradient (noise scale)
                engine.first_micro_batch()
            if last:
                engine.after_backward(self._vsa_grad_scale(), scale)
            return loss
        # Partial PREDICT: the forward and a backward that stops early. Whole-step PREDICT
        # (engine.whole, decided from measurements) and vsa_exact_fraction=0: no backward at all.
        if engine.partial:
            engine.freeze_predicted(True)
            try:
                # Under DDP the reducer would wait for the frozen tensors' gradients forever: keep
                # this backward local and average only the exact tensors' gradients below.
                with self._vsa_no_sync(model):
                    loss = self._vsa_backprop(model, inputs, num_items_in_batch, last)
            finally:
                engine.freeze_predicted(False)
            scale = engine.micro.rescale(engine.params, self.current_gradient_accumulation_steps,
                                         num_items_in_batch) if last else 1.0
            engine.note_loss(loss, last, scale)
            if last and self._vsa_world_size() > 1:
                self._vsa_all_reduce_mean(engine.exact_grads())
        elif self.args.vsa_predict_forward:
            loss = self._vsa_forward_loss(model, inputs, num_items_in_batch)
            engine.note_loss(loss, last)
        else:
            # No forward, no backward, no collective on any micro-batch: hand the running loss the
            # last measured value (logs replace the logged mean by the mean over measured steps, see log()).
            loss = engine.last_loss
            if last:
                engine.forwards_skipped += 1
        if last:
            engine.write_prediction(self._vsa_grad_scale())
        return loss

    def _vsa_backprop(self, model, inputs, num_items_in_batch, last):
        """The Trainer's forward + backward; with ternary accumulation, each micro-batch's
        gradient is held in ternary until the last micro-batch rebuilds the sum."""
        engine = self.vsa
        if engine.accumulator is None:
            return super().training_step(model, inputs, num_items_in_batch)
        with engine.accumulator.micro_batch(engine.step, engine.micro_batch, last):
            loss = super().training_step(model, inputs, num_items_in_batch)
        engine.micro_batch += 1
        return loss

    # ---- multi-process ---------------------------------------------------------------------
    @staticmethod
    def _vsa_world_size() -> int:
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _vsa_no_sync(self, model):
        return self.accelerator.no_sync(model) if self._vsa_world_size() > 1 else contextlib.nullcontext()

    def _vsa_reduce_mean(self, tensor):
        return self.accelerator.reduce(tensor, "mean") if self._vsa_world_size() > 1 else tensor

    def _vsa_all_reduce_mean(self, grads):
        """Average `grads` over processes as DDP does, one flat bucket per dtype."""
        world = self._vsa_world_size()
        for dtype in sorted({g.dtype for g in grads}, key=str):
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group])
            torch.distributed.all_reduce(flat)
            flat /= world
            torch._foreach_copy_(group, [c.view_as(g) for c, g in zip(flat.split([g.numel() for g in group]), group)])
            self.vsa.comm_bytes += flat.numel() * flat.element_size()

    def _vsa_forward_loss(self, model, inputs, num_items_in_batch):
        """The Trainer's loss for this micro-batch, under no_grad (same scaling as training_step)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        return loss.detach() if scaled else loss.detach() / self.current_gradient_accumulation_steps

    def floating_point_ops(self, inputs):
        """Count what ran: a forward is a third of forward+backward, a skipped forward is 0."""
        flos = super().floating_point_ops(inputs)
        if self.args.vsa_enabled and self.vsa is not None and self.vsa.phase is Phase.PREDICT:
            if self.vsa.partial:
                return flos  # forward plus a partial backward: counted as a full step (an upper bound)
            return flos / 3 if self.args.vsa_predict_forward else 0
        return flos

    # ---- logging ---------------------------------------------------------------------------
    def log(self, logs, start_time=None):
        if self.args.vsa_enabled and self.vsa is not None and "loss" in logs:
            measured, n = self.vsa.take_measured_loss()
            # A forward was skipped since the last log (whole-step PREDICT, or a micro-batch adaptive
            # accumulation left out): the same on every rank, decisions are from synchronised values.
            # `loss` stays the Trainer's own (so train_loss is the mean of the logged ones); the steps
            # that ran no forward count there with the last measured loss, and the mean over the steps
            # whose forward ran is logged beside it.
            if self.vsa.forwards_skipped:
                logs["vsa/measured_loss"] = self.accelerator.reduce(measured, "mean").item()  # host sync: logging
                logs["vsa/loss_measured_steps"] = n
                self.vsa.forwards_skipped = 0
            self.vsa.refresh_noise(decide=False)  # every rank logs: the noise estimate's one collective
            # A function of the run's state only (no wall time), and nothing not yet measured (no NaN).
            logs.update({k: v for k, v in self.vsa.stats(timing=False).items() if not (isinstance(v, float) and v != v)})
        super().log(logs, start_time)

    # ---- checkpoints -----------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.args.vsa_enabled:
            self._vsa_resume_dir = None  # (the engine itself is dropped at on_train_begin, _VSACallbackHandler)
            if resume_from_checkpoint:
                if isinstance(resume_from_checkpoint, bool):
                    resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                    if resume_from_checkpoint is None:
                        raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
                self._vsa_resume_dir = resume_from_checkpoint
        try:
            out = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.vsa is not None:
                self.vsa.close()  # the model leaves training without hf_vsa's hooks; statistics stay
        return out

    def _vsa_load(self, directory):
        try:
            path = load_engine(self.vsa, directory, self.args.process_index, self._vsa_world_size())
            logger.info("hf_vsa: restored VSA state from %s", path)
        except (FileNotFoundError, ValueError):
            if not self.args.vsa_reset_state_on_resume:
                raise
            logger.warning("hf_vsa: no usable VSA state in %s; starting it from scratch "
                           "(vsa_reset_state_on_resume=True)", directory, exc_info=True)
            self._vsa_drop_engine()
            self.vsa = VSAEngine(self.args, self.model, reduce_mean=self._vsa_reduce_mean,
                                 world=self._vsa_world_size())

    def _vsa_drop_engine(self):
        if self.vsa is not None:
            self.vsa.close()
            self.vsa = None

    def _save_rng_state(self, output_dir):
        """The Trainer writes a checkpoint's RNG state last before it pushes the checkpoint to the hub and
        rotates old ones: hf_vsa's state goes into the folder here, so no pushed or kept checkpoint
        lacks it. (Not with save_only_model, which saves no optimizer state either.)"""
        super()._save_rng_state(output_dir)
        if not self.args.vsa_enabled or self.vsa is None:
            return
        rows = self.vsa_rank_rows()  # a collective: every rank takes part, rank 0 writes
        if self.args.should_save:
            save_engine(self.vsa, output_dir, rows)

    def vsa_rank_rows(self):
        """Every rank's rank-local statistics, gathered (a collective under DDP)."""
        row = rank_local(self.vsa)[None]
        return self.accelerator.gather(row) if self._vsa_world_size() > 1 else row

    # ---- model card ------------------------------------------------------------------------
    def create_model_card(self, *args, tags=None, plot=None, **kwargs):
        """The Trainer's card (results table, hyperparameters, versions) plus the hf_vsa section
        and tags; rank 0 only, like the Trainer's. `plot`: a PNG (e.g. eval loss vs wall time)
        copied next to the card and embedded in it."""
        if not self.args.vsa_enabled or self.vsa is None:
            return super().create_model_card(*args, tags=tags, **kwargs)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(*args, tags=tags + [t for t in TAGS if t not in tags], **kwargs)
        if self.is_world_process_zero():
            name = None
            if plot is not None:
                name = os.path.basename(plot)
                if os.path.abspath(plot) != os.path.abspath(os.path.join(self.args.output_dir, name)):
                    shutil.copyfile(plot, os.path.join(self.args.output_dir, name))
            add_vsa_section(os.path.join(self.args.output_dir, "README.md"), self.vsa, self.args, name)


class VSATrainer(VSAMixin, Trainer):
    """transformers.Trainer whose optimizer steps go through the VSA phase controller."""

    vsa_args_class = VSATrainingArguments
