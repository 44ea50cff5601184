"""The vsa_* fields that configure hf_vsa, defined once (VSAArguments) and mixed into every config:
VSATrainingArguments = VSAArguments + TrainingArguments; for TRL, VSASFTConfig = VSAArguments +
trl.SFTConfig (hf_vsa/trl.py). A config of your own for another Trainer subclass's arguments:

    @dataclass
    class MyConfig(VSAArguments, OtherTrainer's TrainingArguments subclass): pass
"""
from dataclasses import dataclass, field, fields
from typing import Optional

from transformers import TrainingArguments

from .compress import COMPRESSIONS, ROUNDINGS

PREDICTORS = ("wls", "momentum", "ar")
PREDICT_MODES = ("predict", "coast", "skip")
TRUSTS = ("fitted", "none")
# Named settings. A preset sets the fields it names unless the user gave them another value.
PRESETS = {
    # The method as first sketched (vsa-optim-rs): WLS baseline + velocity, fixed schedule.
    "sketch": dict(vsa_predictor="wls", vsa_warmup_steps=10, vsa_full_steps=5, vsa_predict_steps=20,
                   vsa_correct_every=5, vsa_adaptive_phases=False, vsa_predict_forward=False,
                   vsa_exact_fraction=0.0, vsa_block_drop=1.0, vsa_min_cosine=-1.0, vsa_trust="none", vsa_skip_sparse=False,
                   vsa_retire_after=0, vsa_probe_fraction=0.0),
}
# The sketch's fixed schedule with the AR prediction, every PREDICT step whole (no forward, no backward, every
# tensor predicted), nothing gated or adapted: the benchmark's predict_all. Measured to pay on SmolLM2 with LoRA
# (the Trainer's final eval loss in 0.60-0.71x its time, 3 seeds: results/predict_smollm_lora.json) and to lose
# on full fine-tuning and the other tasks (results/controls_*.json): an opt-in, not the default.
PRESETS["whole_steps"] = dict(PRESETS["sketch"], vsa_predictor="ar", vsa_adaptive_accumulation=False)
# Optimizers that update parameters inside backward: with no backward there is no update at
# all, and a gradient written into .grad is never read.
_BACKWARD_OPTIMIZERS = ("lomo", "adalomo")
# Why the sharded engines are refused; checked on the arguments (here) and, for the same engines set up by
# the accelerate configuration instead (accelerate launch --use_fsdp / --use_deepspeed), by the trainer.
DEEPSPEED_REFUSAL = ("is not supported by VSATrainer (it owns the gradients and the step); supported: single "
                     "process and DDP. Set vsa_enabled=False to use DeepSpeed.")
FSDP_REFUSAL = ("is not supported by VSATrainer yet: hf_vsa's history, gate and noise state are kept per whole "
                "tensor, and its partial backward freezes tensors, which FSDP's sharded parameters and "
                "reduce-scatter do not allow as DDP does (and accelerate runs FSDP on GPUs only, so it has not "
                "been built and tested on the CPU machines hf_vsa is developed on); supported: single process "
                "and DDP (accelerate launch --multi_gpu). Set vsa_enabled=False to use FSDP.")


@dataclass
class VSAArguments:
    """The vsa_* fields and their checks; mix in before a TrainingArguments subclass."""

    vsa_preset: str | None = field(
        default=None,
        metadata={"help": f"Named settings: {sorted(PRESETS)}. A preset sets the vsa_* fields it names that were "
                          "left at their defaults; values you pass explicitly win."},
    )
    vsa_enabled: bool = field(
        default=True,
        metadata={"help": "Route optimizer steps through the VSA phase controller. False: exactly the plain Trainer."},
    )
    vsa_warmup_steps: int = field(
        default=10,
        metadata={"help": "Optimizer steps of ordinary backprop before the first prediction (at least "
                          "vsa_history_window are run, so the predictor has enough history)."},
    )
    vsa_full_steps: int = field(
        default=5, metadata={"help": "Backprop steps at the start of each cycle (FULL phase)."}
    )
    vsa_predict_steps: int = field(
        default=20,
        metadata={"help": "Steps in each PREDICT phase (CORRECT steps inside it included); 0 disables prediction."},
    )
    vsa_correct_every: int = field(
        default=5,
        metadata={"help": "Inside a PREDICT phase, every k-th step is a CORRECT step: real backprop, compared "
                          "with the prediction, and recorded."},
    )
    vsa_history_decay: float = field(
        default=0.95,
        metadata={"help": "Per-step weight decay of recorded gradients in the weighted least squares fit, in (0, 1]."},
    )
    vsa_history_window: int = field(
        default=8,
        metadata={"help": "Recorded gradients the predictor needs before it predicts (>= 2: a line needs two "
                          "points). With vsa_compression='none' the history is kept as running sums, so memory "
                          "does not grow with it; with compression it is the number of compressed records kept."},
    )
    vsa_residual_decay: float = field(
        default=0.5,
        metadata={"help": "Per-step decay, in [0, 1], of the residual (actual - predicted) learned at CORRECT "
                          "steps and added to later predictions; 0 turns the residual off."},
    )
    vsa_residual_threshold: float = field(
        default=1.5,
        metadata={"help": "Early correction: when the relative residual at a CORRECT step exceeds this multiple "
                          "of its running mean, the next CORRECT comes after half the interval. Must be > 1."},
    )
    vsa_adaptive_phases: bool = field(
        default=True,
        metadata={"help": "Back off when the measured training loss rises: a cycle whose mean loss rises by more "
                          "than vsa_loss_threshold doubles FULL (up to 4*full_steps) and halves PREDICT; two falls "
                          "in a row step back towards the configured lengths, never past them (the configured "
                          "schedule is the most a run skips)."},
    )
    vsa_loss_threshold: float = field(
        default=0.1,
        metadata={"help": "Relative rise of the mean training loss over a cycle versus the previous cycle that "
                          "lengthens FULL and shortens PREDICT (> 0)."},
    )
    vsa_predictor: str = field(
        default="ar",
        metadata={"help": "Gradient predictor: 'ar' (per-tensor least-squares autoregression of order "
                          "vsa_ar_order over the stored records, closed form from their inner products; follows "
                          "oscillating gradients), 'wls' (closed-form weighted least squares baseline + "
                          "velocity*t) or 'momentum' (bias-corrected exponential moving average).",
                  "choices": list(PREDICTORS)},
    )
    vsa_ar_order: int = field(
        default=2,
        metadata={"help": "'ar' predictor: coefficients per tensor (g_t ~ sum_j c_j g_{t-j}, j = 1..order), "
                          ">= 1 and < vsa_history_window."},
    )
    vsa_ar_ridge: float = field(
        default=1e-3,
        metadata={"help": "'ar' predictor: ridge added to the normal equations, relative to their trace (>= 0)."},
    )
    vsa_adaptive_accumulation: bool = field(
        default=True,
        metadata={"help": "With gradient_accumulation_steps = K > 1: each optimizer step runs the forward and "
                          "backward of only its last m micro-batches and rescales their sum by K/m, m the fewest "
                          "whose expected optimizer steps to a given loss exceed the full batch's by at most "
                          "vsa_tolerance, by the steps-vs-batch law S(B) = S_min (1 + B_noise / B) "
                          "(McCandlish et al. 2018) with B_noise measured during the run (vsa/noise_scale). At "
                          "least 2 in one process, 1 per rank under DDP (two gradients measure the noise scale); "
                          "all K until two steps have measured it, then revisited at each WARMUP step, each FULL or "
                          "PREDICT block start and CORRECT step. The "
                          "skipped micro-batches' examples are loaded but not trained on."},
    )
    vsa_tolerance: float = field(
        default=0.05,
        metadata={"help": "The fraction of extra optimizer steps to a given loss that each measured skip may "
                          "cost (> 0): adaptive accumulation's fewer micro-batches (by the noise scale), and "
                          "whole-step PREDICT (by the predictions' measured worth against a backward). The cost is the "
                          "steps-versus-batch law's estimate from the measured noise scale; with a fixed learning "
                          "rate and Adam the runs measured need more (docs/method.md, 'What bounds the gain at "
                          "large batch')."},
    )
    vsa_predict_mode: str = field(
        default="predict",
        metadata={"help": "What a PREDICT step gives the tensors it does not compute: 'predict' (the predictor's "
                          "gradient where the gate admits it, else no update), 'coast' (a zero gradient: the "
                          "optimizer moves them on its momentum alone), 'skip' (no update). 'coast' and 'skip' are "
                          "the sceptic's controls for the prediction (scripts/benchmark.py configs of those names).",
                  "choices": list(PREDICT_MODES)},
    )
    vsa_whole_step: bool = field(
        default=True,
        metadata={"help": "Let PREDICT steps skip the forward, every micro-batch's backward and the gradient "
                          "all-reduce where it is measured to pay: a predicted step is worth v = e * c / kappa of "
                          "a backward (e: the gradient energy share of the tensors the gate admits, c: their "
                          "cosine with the actual gradient at CORRECT steps, kappa = 1 / (1 + B_noise / B): the "
                          "mean's share of a minibatch gradient, from the measured noise scale), and a lower "
                          "confidence bound of v over the last 8 CORRECT steps (their mean less two standard "
                          "errors, at least two of them) must keep the extra optimizer steps within "
                          "vsa_tolerance. Only where a step has two or more micro-batch gradients (gradient "
                          "accumulation, or several processes), which measure kappa without bias; with one, "
                          "PREDICT steps run the partial backward or back off. False: never."},
    )
    vsa_momentum: float = field(
        default=0.9, metadata={"help": "EMA coefficient of the 'momentum' predictor, in [0, 1)."}
    )
    vsa_predict_forward: bool = field(
        default=False,
        metadata={"help": "With vsa_exact_fraction=0: run the forward pass (under no_grad) on PREDICT steps, so the "
                          "logged loss is measured on every step (a partial backward always runs the forward). Off: the forward is skipped too, and the logged loss is the mean over "
                          "measured steps only."},
    )
    vsa_exact_fraction: float = field(
        default=0.2,
        metadata={"help": "Partial backward on PREDICT steps: the last fraction, in [0, 1), of the trainable "
                          "tensors (in registration order: the output end of the network) get exact gradients "
                          "from a backward that stops below them; only the tensors before them are predicted "
                          "(and only they are tracked by the predictor). 0: PREDICT steps run no backward."},
    )
    vsa_block_drop: float = field(
        default=0.0,
        metadata={"help": "0 (the default): PREDICT steps that are not whole run full backprop, as measured on "
                          "SmolLM2 (DropBP here and as published cost eval loss at equal wall time; docs/method.md). "
                          "Above 0, with vsa_exact_fraction > 0, DropBP on PREDICT steps: each transformer block (of the "
                          "model's longest list of identical layers) whose trainable tensors are all predicted "
                          "skips its backward with this probability, in [0, 1], drawn per step from vsa_seed. A "
                          "skipped block passes its output's gradient to its input unchanged (the residual path); "
                          "its tensors get the prediction, if the gate admits them, or no update. Every other "
                          "tensor (kept blocks, embeddings; not those vsa_skip_sparse leaves out) gets its exact "
                          "gradient. 1, or a model with no such blocks: every predicted tensor is frozen, so the "
                          "backward stops at the exact tensors."},
    )
    vsa_adaptive_block_drop: bool = field(
        default=True,
        metadata={"help": "Skip only the blocks whose measured gradient signal per unit of backward cost is "
                          "below the step's, more often the noisier: a_k = sqrt(kappa_k), kappa_k the mean's share "
                          "of block k's gradient (from the noise scale with several micro-batches per step, else "
                          "the running lag-1 gradient cosine at consecutive backprop steps), and block k is "
                          "skipped with probability vsa_block_drop * (1 - a_k) where a_k < 2/3 of the "
                          "size-weighted mean of a over the blocks and the exact tensors (a backward is 2/3 of a "
                          "step's FLOPs), never elsewhere; refreshed at the start of each PREDICT block. Where no "
                          "block is skipped and whole-step PREDICT does not pay, the PREDICT steps run full "
                          "backprop (logged as vsa/backed_off), so a partial backward never costs progress it "
                          "does not save in time. Off: every block is skipped with probability vsa_block_drop."},
    )
    vsa_min_cosine: float = field(
        default=0.2,
        metadata={"help": "A predicted tensor whose prediction cosine, measured at CORRECT steps (running mean), "
                          "is below this, or that no CORRECT step has measured yet, gets no update on PREDICT steps "
                          "(grad=None) until it recovers. In [-1, 1]; -1 predicts every tensor from the start."},
    )
    vsa_retire_after: int = field(
        default=2,
        metadata={"help": "A predicted tensor that vsa_min_cosine has kept out at this many consecutive CORRECT "
                          "steps is retired: it is no longer recorded, compared nor predicted (it changes on "
                          "backprop steps only), and its history buffers are freed, so the compressor stops "
                          "spending time and memory on a prediction that has not been good enough to use. "
                          "0: never retire."},
    )
    vsa_state_budget: float = field(
        default=2.0,
        metadata={"help": "The most hf_vsa's history may hold, in bytes per trainable parameter (a full int4 history "
                          "costs about 5.7 per tracked one). Where the prediction earns full histories, they go to "
                          "the tensors whose prediction the probe measured best against the zero gradient, best "
                          "first, while they fit; the probe itself costs about 0.1. With the probe off (vsa_probe_fraction=0 "
                          "or vsa_min_cosine=-1) every tensor is tracked from the start, whatever this says. > 0."},
    )
    vsa_track_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Only parameters whose name contains one of these strings (as PEFT's target_modules, e.g. "
                          "['mlp', 'attn']) may get a full history and a prediction; the others get exact gradients "
                          "or none on PREDICT steps. None: every trainable parameter."},
    )
    vsa_probe_fraction: float = field(
        default=1 / 64,
        metadata={"help": "With the gate on (vsa_min_cosine > -1): the predictor first runs on a fixed sample of "
                          "the model, this fraction of each tensor (a few contiguous windows at seeded offsets, at "
                          "least 4096 elements, small tensors whole), tracked as one flat tensor (a few ops a step "
                          "whatever the number of tensors). The tensors get a full history only once CORRECT steps "
                          "measure, on the sample, that the prediction beats the zero gradient (the optimizer "
                          "coasting on its momentum); until then PREDICT steps give them no update. In [0, 1]; "
                          "0: full histories from the start."},
    )
    vsa_skip_sparse: bool = field(
        default=True,
        metadata={"help": "Tensors whose first recorded gradient is at least half exact zeros (embedding rows of "
                          "tokens absent from the batch) are never predicted nor recorded: they change on backprop "
                          "steps only, and the compressor skips them."},
    )
    vsa_trust: str = field(
        default="none",
        metadata={"help": "Size of a predicted update. 'fitted': each predicted tensor's gradient is multiplied by "
                          "its trust factor, the least-squares scale <g, p> / |p|^2 of prediction p against the actual "
                          "gradient g measured at CORRECT steps (running mean, clipped to [0, 1]), so a prediction "
                          "that explains little of the gradient moves the weights little. 'none': predictions are "
                          "written unscaled.",
                  "choices": list(TRUSTS)},
    )
    vsa_compression: str = field(
        default="int4",
        metadata={"help": "How the predictor stores its gradient history: 'int4' (a ring of the last "
                          "vsa_history_window records, 4 bits per element, block scales, error feedback, residual in "
                          "4 bits; 1.4x the predicted parameters' bytes for window 8), 'ternary' (the same in 2 bits "
                          "per element; 0.9x, but its rounding noise adds up in the AR forecast, a weighted sum of "
                          "the records: a third of the cosine lost, where int4 loses almost none), 'vsa' (the "
                          "ternary records bound to seeded random keys and bundled vsa_bundle_size to a "
                          "superposition; 0.66x, and the bundles' crosstalk lowers the cosine further) or 'none' "
                          "(fp32: running sums for 'wls'/'momentum', 3x; a ring of fp32 records for 'ar', window x).",
                  "choices": list(COMPRESSIONS)},
    )
    vsa_compression_block: int = field(
        default=256,
        metadata={"help": "Elements per block that share one fp32 scale in compressed records (a multiple of 4, >= 4)."},
    )
    vsa_ternary_rounding: str = field(
        default="deterministic",
        metadata={"help": "Rounding to {-1, 0, +1} of stored records ('ternary' and 'vsa' compression; 'int4' "
                          "records are rounded to the nearest level): 'deterministic' (threshold 0.7*mean|x| per "
                          "block) or 'stochastic' (unbiased, seeded by vsa_seed and the step).",
                  "choices": list(ROUNDINGS)},
    )
    vsa_bundle_size: int = field(
        default=4,
        metadata={"help": "vsa compression: records bundled into one superposition, in [2, 7] (4-bit sums)."},
    )
    vsa_ternary_accumulation: bool = field(
        default=False,
        metadata={"help": "With gradient_accumulation_steps > 1: each micro-batch's gradient is stored as "
                          "stochastically rounded ternary codes (2 bits per element, unbiased, seeded) as soon as "
                          "backward produces it, instead of accumulating in the full-precision .grad; the sum is "
                          "rebuilt once, in the optimizer step's last micro-batch."},
    )
    vsa_reset_state_on_resume: bool = field(
        default=False,
        metadata={"help": "When resuming from a checkpoint without usable VSA state, start the VSA state from "
                          "scratch with a warning instead of refusing."},
    )
    vsa_seed: int | None = field(
        default=None, metadata={"help": "Seed for hf_vsa's own generators; None uses --seed."}
    )

    def __post_init__(self):
        super().__post_init__()  # the TrainingArguments subclass this is mixed into
        if self.vsa_preset is not None:
            if self.vsa_preset not in PRESETS:
                raise ValueError(f"vsa_preset must be one of {sorted(PRESETS)} or None, got {self.vsa_preset!r}")
            defaults = {f.name: f.default for f in fields(VSAArguments)}
            for k, v in PRESETS[self.vsa_preset].items():
                if getattr(self, k) == defaults[k]:
                    setattr(self, k, v)
        if self.vsa_seed is None:
            self.vsa_seed = self.seed
        if not self.vsa_enabled:
            return
        for name in ("vsa_warmup_steps", "vsa_full_steps", "vsa_predict_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.vsa_full_steps == 0 and self.vsa_predict_steps == 0:
            raise ValueError("vsa_full_steps and vsa_predict_steps cannot both be 0")
        if self.vsa_correct_every < 1:
            raise ValueError(f"vsa_correct_every must be >= 1, got {self.vsa_correct_every}")
        if not 0.0 < self.vsa_history_decay <= 1.0:
            raise ValueError(f"vsa_history_decay must be in (0, 1], got {self.vsa_history_decay}")
        if self.vsa_history_window < 2:
            raise ValueError(f"vsa_history_window must be >= 2, got {self.vsa_history_window}")
        if not 0.0 <= self.vsa_residual_decay <= 1.0:
            raise ValueError(f"vsa_residual_decay must be in [0, 1], got {self.vsa_residual_decay}")
        if self.vsa_residual_threshold <= 1.0:
            raise ValueError(f"vsa_residual_threshold must be > 1, got {self.vsa_residual_threshold}")
        if self.vsa_loss_threshold <= 0.0:
            raise ValueError(f"vsa_loss_threshold must be > 0, got {self.vsa_loss_threshold}")
        if not 0.0 <= self.vsa_exact_fraction < 1.0:
            raise ValueError(f"vsa_exact_fraction must be in [0, 1), got {self.vsa_exact_fraction}")
        if self.vsa_retire_after < 0:
            raise ValueError(f"vsa_retire_after must be >= 0 (0: never retire), got {self.vsa_retire_after}")
        if not 0.0 <= self.vsa_block_drop <= 1.0:
            raise ValueError(f"vsa_block_drop must be in [0, 1], got {self.vsa_block_drop}")
        if not self.vsa_state_budget > 0:
            raise ValueError(f"vsa_state_budget must be > 0 (bytes per trainable parameter), got {self.vsa_state_budget}")
        if self.vsa_track_modules is not None and (
                isinstance(self.vsa_track_modules, str) or not all(isinstance(m, str) and m for m in self.vsa_track_modules)):
            raise ValueError(f"vsa_track_modules must be a list of non-empty name substrings or None, got "
                             f"{self.vsa_track_modules!r}")
        if not 0.0 <= self.vsa_probe_fraction <= 1.0:
            raise ValueError(f"vsa_probe_fraction must be in [0, 1] (0: no probe), got {self.vsa_probe_fraction}")
        if not -1.0 <= self.vsa_min_cosine <= 1.0:
            raise ValueError(f"vsa_min_cosine must be in [-1, 1], got {self.vsa_min_cosine}")
        if self.vsa_predict_mode not in PREDICT_MODES:
            raise ValueError(f"vsa_predict_mode must be one of {PREDICT_MODES}, got {self.vsa_predict_mode!r}")
        if self.vsa_predictor not in PREDICTORS:
            raise ValueError(f"vsa_predictor must be one of {PREDICTORS}, got {self.vsa_predictor!r}")
        if self.vsa_predictor == "ar" and not 1 <= self.vsa_ar_order < self.vsa_history_window:
            raise ValueError(f"vsa_ar_order must be >= 1 and < vsa_history_window ({self.vsa_history_window}) "
                             f"with vsa_predictor='ar' (a fit of order k needs k + 1 records), got {self.vsa_ar_order}")
        if self.vsa_tolerance <= 0:
            raise ValueError(f"vsa_tolerance must be > 0, got {self.vsa_tolerance}")
        if self.vsa_ar_ridge < 0:
            raise ValueError(f"vsa_ar_ridge must be >= 0, got {self.vsa_ar_ridge}")
        if self.vsa_trust not in TRUSTS:
            raise ValueError(f"vsa_trust must be one of {TRUSTS}, got {self.vsa_trust!r}")
        if self.vsa_compression not in COMPRESSIONS:
            raise ValueError(f"vsa_compression must be one of {COMPRESSIONS}, got {self.vsa_compression!r}")
        if self.vsa_compression_block < 4 or self.vsa_compression_block % 4:
            raise ValueError(f"vsa_compression_block must be a multiple of 4 and >= 4, got {self.vsa_compression_block}")
        if self.vsa_ternary_rounding not in ROUNDINGS:
            raise ValueError(f"vsa_ternary_rounding must be one of {ROUNDINGS}, got {self.vsa_ternary_rounding!r}")
        if not 2 <= self.vsa_bundle_size <= 7:
            raise ValueError(f"vsa_bundle_size must be in [2, 7], got {self.vsa_bundle_size}")
        if not 0.0 <= self.vsa_momentum < 1.0:
            raise ValueError(f"vsa_momentum must be in [0, 1), got {self.vsa_momentum}")
        optim = str(getattr(self.optim, "value", self.optim)).lower()
        if optim in _BACKWARD_OPTIMIZERS or "layerwise" in optim:
            raise ValueError(
                f"optim={optim!r} updates parameters inside backward, which PREDICT steps skip; "
                "use an optimizer that reads .grad (e.g. adamw_torch) or set vsa_enabled=False")
        if self.deepspeed:
            raise ValueError(f"deepspeed {DEEPSPEED_REFUSAL}")
        if self.fsdp:
            raise ValueError(f"fsdp {FSDP_REFUSAL}")


@dataclass
class VSATrainingArguments(VSAArguments, TrainingArguments):
    """TrainingArguments plus the vsa_* fields (VSAArguments)."""
