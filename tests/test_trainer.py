"""VSATrainer through its public API on a tiny real BERT classifier."""
import os

import pytest
import torch
from accelerate.utils import AutocastKwargs
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import BackwardCounter, make_dataset, make_model
from hf_vsa import Phase, PhaseController, VSATrainer, VSATrainingArguments
from hf_vsa.policy import drop_probabilities

# (DropBP at its configured rate: the tiny model's blocks carry alike signal, so the measured rate
# would back PREDICT steps off to backprop; tests of that pass vsa_adaptive_block_drop=True)
SCHEDULE = dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                vsa_correct_every=3, vsa_adaptive_phases=False, vsa_adaptive_block_drop=False,
                vsa_probe_fraction=0.0)  # (full histories from the start: tests/test_probe.py tests the probe)
# PREDICT steps with no backward at all, every tensor predicted (the defaults use a partial backward).
NO_BACKWARD = dict(SCHEDULE, vsa_exact_fraction=0.0, vsa_min_cosine=-1.0)


def args(tmp_path, **kw):
    # (vsa_block_drop=0.5: PREDICT steps run the partial backward, which these tests exercise; the default 0
    # backs them off to backprop)
    base = dict(output_dir=str(tmp_path / "out"), max_steps=24, per_device_train_batch_size=8, learning_rate=1e-3,
                logging_steps=5, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                vsa_block_drop=0.5)
    base.update(kw)
    return VSATrainingArguments(**base)


def expected_phases(n, **sched):
    c = PhaseController(warmup_steps=sched["vsa_warmup_steps"], full_steps=sched["vsa_full_steps"],
                        predict_steps=sched["vsa_predict_steps"], correct_every=sched["vsa_correct_every"],
                        min_history=sched["vsa_history_window"], adaptive=False)
    return [c.next_phase().name for _ in range(n)]


@pytest.mark.parametrize("accum", [1, 4])
def test_backward_passes_follow_the_schedule(tmp_path, accum):
    model = make_model()
    low = model.bert.embeddings.word_embeddings.weight
    counter = BackwardCounter(low)
    # (no early CORRECT steps: the schedule alone decides the phases here)
    t = VSATrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=accum, vsa_residual_threshold=1e9,
                                          **NO_BACKWARD),
                   train_dataset=make_dataset(512), callbacks=[counter])
    t.train()
    phases = expected_phases(24, **SCHEDULE)
    assert t.vsa.phases == phases
    # Every micro-batch of a backprop step runs backward, no micro-batch of a PREDICT step does:
    # the phase only changes between optimizer steps.
    assert counter.per_step == [0 if p == "PREDICT" else accum for p in phases]
    assert t.vsa.controller.counts["PREDICT"] == phases.count("PREDICT") > 0


class MoveWatch(TrainerCallback):
    """Per optimizer step: (phase, dtype of param.grad at the optimizer step, whether param moved)."""

    def __init__(self, param):
        self.param, self.rows, self.trainer = param, [], None

    def on_step_begin(self, *a, **kw):
        self.before, self.grad_dtype = self.param.detach().clone(), None

    def on_pre_optimizer_step(self, *a, **kw):
        self.grad_dtype = None if self.param.grad is None else self.param.grad.dtype

    def on_step_end(self, *a, **kw):
        self.rows.append((self.trainer.vsa.phase, self.grad_dtype, not torch.equal(self.before, self.param)))


def watched(model, param, trainer_args):
    watch = MoveWatch(param)
    watch.trainer = VSATrainer(model=model, args=trainer_args, train_dataset=make_dataset(512), callbacks=[watch])
    return watch.trainer, watch


def test_parameters_move_on_predict_steps(tmp_path):
    model = make_model()
    t, watch = watched(model, model.bert.encoder.layer[0].attention.self.query.weight, args(tmp_path, **NO_BACKWARD))
    t.train()
    predict = [moved for phase, _, moved in watch.rows if phase is Phase.PREDICT]
    assert predict and all(predict)


def test_disabled_is_bit_identical_to_the_plain_trainer(tmp_path):
    data = make_dataset(512)
    a = make_model()
    VSATrainer(model=a, args=args(tmp_path, vsa_enabled=False), train_dataset=data).train()
    b = make_model()
    plain = TrainingArguments(**{k: v for k, v in args(tmp_path).to_dict().items()
                                 if not k.startswith("vsa_") and k in TrainingArguments.__dataclass_fields__
                                 and TrainingArguments.__dataclass_fields__[k].init})
    Trainer(model=b, args=plain, train_dataset=data).train()
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_two_identical_runs_are_identical(tmp_path):
    out = []
    for i in range(2):
        m = make_model()
        t = VSATrainer(model=m, args=args(tmp_path / str(i), **NO_BACKWARD), train_dataset=make_dataset(512))
        t.train()
        out.append((m.state_dict(), t.vsa.phases))
    assert out[0][1] == out[1][1]
    for n, x in out[0][0].items():
        assert torch.equal(x, out[1][0][n]), n


def test_partial_backward_stops_below_the_exact_tensors_with_block_drop_1(tmp_path):
    model = make_model()
    low = BackwardCounter(model.bert.embeddings.word_embeddings.weight)
    top = BackwardCounter(model.classifier.weight)
    t = VSATrainer(model=model, args=args(tmp_path, vsa_exact_fraction=0.3, vsa_block_drop=1.0, vsa_whole_step=False,
                                          **SCHEDULE),
                   train_dataset=make_dataset(512), callbacks=[low, top])
    t.train()
    phases = t.vsa.phases
    assert top.per_step == [1] * 24  # the head gets an exact gradient on every step
    assert low.per_step == [0 if p == "PREDICT" else 1 for p in phases]
    head = next(i for i, p in enumerate(t.vsa.params) if p is model.classifier.weight)
    assert head in t.vsa.exact  # tracked (whole-step PREDICT predicts it), never predicted on a partial step
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the step


def test_untrusted_tensors_get_no_update_on_predict_steps(tmp_path):
    model = make_model()
    t = VSATrainer(model=model, args=args(tmp_path, vsa_min_cosine=1.0, **SCHEDULE), train_dataset=make_dataset(512))
    t.train()
    # No prediction reaches cosine 1.0: after the first CORRECT step every tensor is left alone.
    assert t.vsa.tracker.predict_mask == [False] * len(t.vsa.params)


@pytest.mark.parametrize("trust", ["fitted", "none"])
def test_predicted_gradient_is_scaled_by_the_measured_trust(tmp_path, trust):
    model = make_model()
    seen = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **kw):  # after the Trainer's clipping (off here)
            e = t.vsa
            if e.phase is Phase.PREDICT and e.tracker.corrections:
                pred = e.tracker.windows.views(e.tracker.predictor.predict(e.step)[0])  # per tensor
                seen.append([(e.params[i].grad.clone(), pred[i], e.tracker.tensor_trust[i].item())
                             for i in e.tracker.tracked])

    t = VSATrainer(model=model, args=args(tmp_path, vsa_trust=trust, max_grad_norm=0.0, **NO_BACKWARD),
                   train_dataset=make_dataset(512), callbacks=[Grab()])
    t.train()
    assert seen
    factors = [f for step in seen for _, _, f in step]
    assert all(0.0 <= f <= 1.0 for f in factors) and min(factors) < 0.99  # measured, not a constant
    for step in seen:
        for grad, pred, f in step:
            torch.testing.assert_close(grad, pred * (f if trust == "fitted" else 1.0), rtol=1e-5, atol=1e-7)


def test_logs_report_phase_statistics_and_measured_loss(tmp_path):
    t = VSATrainer(model=make_model(), args=args(tmp_path, logging_steps=6, **NO_BACKWARD),
                   train_dataset=make_dataset(512))
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert len(logs) == 4
    for key in ("vsa/phase", "vsa/backward_fraction", "vsa/prediction_cosine", "vsa/measured_loss",
                "vsa/steps_predict", "vsa/steps_full", "vsa/steps_correct", "vsa/steps_warmup"):
        assert key in logs[-1], key
    assert "vsa/speedup_estimate" in t.vsa.stats()  # (wall time: the card and summaries, not the logs)
    last = logs[-1]
    n = len(t.vsa.phases)
    assert last["vsa/backward_fraction"] == pytest.approx(1 - t.vsa.phases.count("PREDICT") / n)
    assert -1.0 <= last["vsa/prediction_cosine"] <= 1.0
    # The logged loss is the Trainer's; the mean of the measured (forward) steps only is logged beside it.
    assert all(0 < h["loss"] < 2 and 0 < h["vsa/measured_loss"] < 2 for h in logs)
    assert sum(h["vsa/loss_measured_steps"] for h in logs) == n - t.vsa.phases.count("PREDICT")


def test_a_standard_script_runs_unchanged_after_the_swap(tmp_path):
    pytest.importorskip("tensorboard")
    a = args(tmp_path, max_steps=30, eval_strategy="steps", eval_steps=10, save_strategy="steps", save_steps=10,
             load_best_model_at_end=True, metric_for_best_model="eval_loss", lr_scheduler_type="cosine",
             warmup_steps=3, max_grad_norm=0.5, report_to="tensorboard",
             save_total_limit=2, **SCHEDULE)
    t = VSATrainer(model=make_model(), args=a, train_dataset=make_dataset(512), eval_dataset=make_dataset(64, 1))
    out = t.train()
    assert out.global_step == 30
    assert any("eval_loss" in h for h in t.state.log_history)
    ckpts = sorted(d for d in os.listdir(a.output_dir) if d.startswith("checkpoint-"))
    assert len(ckpts) <= 2 and all(os.path.exists(os.path.join(a.output_dir, c, "vsa_state.safetensors"))
                                   for c in ckpts)
    assert t.state.best_model_checkpoint is not None
    assert any(f.startswith("events") for _, _, fs in os.walk(a.output_dir) for f in fs)  # tensorboard wrote


def test_vsa_trainer_needs_vsa_arguments(tmp_path):
    with pytest.raises(TypeError, match="VSATrainingArguments"):
        VSATrainer(model=make_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                              use_cpu=True), train_dataset=make_dataset(32))


def test_sparse_gradient_tensors_are_neither_predicted_nor_recorded(tmp_path):
    model = make_model()
    emb = model.bert.embeddings.token_type_embeddings.weight  # 2 rows; the data uses only type 0
    dense = model.bert.encoder.layer[0].attention.self.query.weight
    moved = []

    class Watch(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.before = emb.detach().clone(), dense.detach().clone()

        def on_step_end(self, *a, **kw):
            moved.append((t.vsa.phase, not torch.equal(self.before[0], emb), not torch.equal(self.before[1], dense)))

    t = VSATrainer(model=model, args=args(tmp_path, **NO_BACKWARD), train_dataset=make_dataset(512),
                   callbacks=[Watch()])
    t.train()
    e = t.vsa
    i_emb = next(i for i, p in enumerate(e.params) if p is emb)
    i_dense = next(i for i, p in enumerate(e.params) if p is dense)
    assert i_emb not in e.tracker.tracked and i_dense in e.tracker.tracked
    # the flat history holds the dense tensor's blocks, none of the embedding's
    assert e.tracker.windows.lengths[i_emb] == 0 and e.tracker.windows.lengths[i_dense] == dense.numel()
    assert e.tracker.history.codes[0].any()
    predict = [(m_emb, m_dense) for phase, m_emb, m_dense in moved if phase is Phase.PREDICT]
    assert predict and not any(m for m, _ in predict) and all(m for _, m in predict)
    assert all(m_emb for phase, m_emb, _ in moved if phase is not Phase.PREDICT)  # backprop steps update it


def test_sketch_preset_and_skip_sparse_off_predict_every_tensor(tmp_path):
    t = VSATrainer(model=make_model(), args=args(tmp_path, vsa_skip_sparse=False, **NO_BACKWARD),
                   train_dataset=make_dataset(512))
    t.train()
    assert t.vsa.tracker.tracked == list(range(len(t.vsa.params)))
    skipped = VSATrainer(model=make_model(), args=args(tmp_path / "skip", **NO_BACKWARD), train_dataset=make_dataset(512))
    skipped.train()
    assert len(skipped.vsa.tracker.tracked) < len(skipped.vsa.params)
    assert skipped.vsa.tracker.state_memory_ratio() < t.vsa.tracker.state_memory_ratio()  # the dropped tensors' buffers are freed
    # ...and were never allocated: buffers come at the first record, after the drop, so the peak excludes them
    assert skipped.vsa.tracker.peak_state_ratio == skipped.vsa.tracker.state_memory_ratio() > 0
    assert VSATrainingArguments(output_dir=str(tmp_path), vsa_preset="sketch").vsa_skip_sparse is False


class GateLog(TrainerCallback):
    """After each CORRECT step: the gate's mask and the tensors still tracked."""

    def __init__(self):
        self.rows = []

    def on_step_end(self, args, state, control, **kw):
        e = self.trainer.vsa
        if e.phase is Phase.CORRECT:
            self.rows.append((list(e.tracker.predict_mask), list(e.tracker.tracked)))


def test_tensors_the_gate_keeps_out_retire_after_consecutive_corrections(tmp_path):
    log = GateLog()
    t = VSATrainer(model=make_model(), args=args(tmp_path, max_steps=60, vsa_min_cosine=0.1, vsa_retire_after=2,
                                                 **SCHEDULE),
                   train_dataset=make_dataset(512), callbacks=[log])
    log.trainer = t
    t.train()
    e = t.vsa
    tracked, streak = set(log.rows[0][1]), {}  # nothing retires at the first CORRECT step
    retired_any = False
    for mask, active in log.rows:
        for i in sorted(tracked):
            streak[i] = 0 if mask[i] else streak.get(i, 0) + 1
        expected = {i for i in tracked if streak[i] < 2}
        retired_any |= expected != tracked
        assert set(active) == expected
        tracked = expected
    assert retired_any and tracked  # the rule retired some tensors and kept others
    w, block = e.tracker.windows, e.args.vsa_compression_block
    # the flat history holds the blocks of the tracked tensors only: a retired tensor's are freed...
    assert e.tracker.history.scales[0].shape[1] * block == w.numel == sum(w.padded[i] for i in tracked)
    for i in set(range(len(e.params))) - tracked:
        assert w.lengths[i] == 0
        assert not e.tracker.predict_mask[i]  # ...and it is never predicted again
    assert t.state.log_history[-2]["vsa/tracked_tensor_fraction"] == len(tracked) / len(e.params)


def test_retired_tensors_move_on_backprop_steps_only(tmp_path):
    model, low = make_model(), []
    lower = model.bert.encoder.layer[0].attention.self.query.weight  # a predicted (tracked) tensor

    class Watch(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.before = lower.detach().clone()

        def on_step_end(self, *a, **kw):
            low.append((t.vsa.phase, not torch.equal(self.before, lower), list(t.vsa.tracker.tracked)))

    # A gate nothing passes: every tracked tensor retires at the second CORRECT step. No block
    # runs its backward on PREDICT steps (vsa_block_drop=1).
    t = VSATrainer(model=model, args=args(tmp_path, max_steps=40, vsa_min_cosine=1.0, vsa_retire_after=2,
                                          vsa_skip_sparse=False, vsa_block_drop=1.0, **SCHEDULE),
                   train_dataset=make_dataset(512), callbacks=[Watch()])
    t.train()
    corrects = [k for k, (phase, _, _) in enumerate(low) if phase is Phase.CORRECT]
    assert low[corrects[0]][2] and low[corrects[1]][2] == []  # all tracked after one, none after two
    after = low[corrects[1] + 1:]
    assert any(p is Phase.PREDICT for p, _, _ in after)
    assert all(moved == (phase is not Phase.PREDICT) for phase, moved, _ in after)
    assert t.vsa.tracker.state_memory_ratio() < 1e-3  # every buffer freed


@pytest.mark.parametrize("kw", [dict(vsa_retire_after=0), dict(vsa_min_cosine=-1.0)], ids=["retire_off", "gate_off"])
def test_nothing_retires_when_retirement_or_the_gate_is_off(tmp_path, kw):
    base = dict(vsa_min_cosine=1.0, vsa_retire_after=2, vsa_skip_sparse=False, **SCHEDULE)
    t = VSATrainer(model=make_model(), args=args(tmp_path, max_steps=40, **{**base, **kw}),
                   train_dataset=make_dataset(512))
    t.train()
    assert t.vsa.tracker.tracked == list(range(len(t.vsa.params)))


@pytest.mark.parametrize("kind", ["none", "ternary", "vsa"])
def test_a_ring_records_only_the_steps_it_still_holds_when_read(tmp_path, monkeypatch, kind):
    from hf_vsa.predictor import GradientPredictor
    recorded, record = [], GradientPredictor.record

    def spy(self, grads, t, finite=None):
        recorded.append(t)
        return record(self, grads, t, finite)

    monkeypatch.setattr(GradientPredictor, "record", spy)
    state = []

    class Watch(TrainerCallback):
        def on_step_end(self, *a, **kw):
            state.append(t.vsa.tracker.state_memory_ratio())

    # WARMUP 6 + FULL 2: 8 backprop steps before the first read; a ring of 4 holds the last 4.
    sched = dict(SCHEDULE, vsa_warmup_steps=6, vsa_history_window=4, vsa_bundle_size=2, vsa_retire_after=0)
    # (No tensor retires: a retirement cuts the history, and restarts a vsa one.)
    t = VSATrainer(model=make_model(), args=args(tmp_path, vsa_compression=kind, **sched),
                   train_dataset=make_dataset(512), callbacks=[Watch()])
    t.train()
    # No buffer exists before the first record; from it on, the state is the peak (nothing retires here).
    assert state[:recorded[0]] == [0.0] * recorded[0] and state[recorded[0]] == t.vsa.tracker.peak_state_ratio > 0
    phases = t.vsa.phases
    first_read = phases.index("PREDICT")
    backprop = [k for k, p in enumerate(phases) if p != "PREDICT"]
    if t.vsa.tracker.history is None:  # running sums: every record keeps a (decayed) weight in the fit
        assert recorded == backprop
    else:  # later FULL blocks (2 steps) are shorter than the ring: only the first 4 steps are skipped
        assert recorded == [k for k in backprop if k >= first_read - 4]
        # (vsa: a bundle just begun holds one record, the one before it was dropped whole)
        assert len(t.vsa.tracker.history.filled()) == (3 if kind == "vsa" else 4)


@pytest.mark.parametrize("gate", [-0.99, -1.0], ids=["gate_on", "gate_off"])
def test_no_tensor_is_predicted_before_its_prediction_is_measured(tmp_path, gate):
    seen = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **kw):
            e = t.vsa
            if e.phase is Phase.PREDICT:
                # predicted gradients, and how many tensors could have one: the tensors of the
                # blocks that ran their backward this step (DropBP) have their exact gradient
                predictable = set(e.tracker.tracked) - e.computed
                seen.append((e.tracker.corrections, sum(e.params[i].grad is not None for i in predictable), len(predictable)))

    # (SCHEDULE's fixed DropBP rate: the adaptive one skips few blocks of this tiny model, and only
    # skipped blocks take predictions.)
    t = VSATrainer(model=make_model(), args=args(tmp_path, vsa_min_cosine=gate, vsa_retire_after=0, **SCHEDULE),
                   train_dataset=make_dataset(512), callbacks=[Grab()])
    t.train()
    before = [(n, m) for c, n, m in seen if c == 0]
    after = [n for c, n, _ in seen if c > 0]
    assert before and after
    if gate > -1.0:  # the gate admits only what a CORRECT step has measured
        assert [n for n, _ in before] == [0] * len(before) and max(after) > 0
    else:  # gate off (the sketch preset): every tracked tensor is predicted from the first PREDICT step
        assert all(n == m for n, m in before) and max(m for _, m in before) > 0


@pytest.mark.parametrize("precision", ["bf16_weights", "bf16_autocast"])
def test_bf16_training_predicts_gradients_in_the_parameters_dtype(tmp_path, precision):
    # A model loaded in bfloat16 (bf16 parameters, gradients and optimizer state) and bf16=True
    # (autocast over fp32 parameters): predicted gradients land in .grad in the parameter's dtype
    # and move the parameters on PREDICT steps; the history is kept in fp32 either way.
    model = make_model()
    kw = {"bf16": True} if precision == "bf16_autocast" else {}
    if precision == "bf16_weights":
        model = model.to(torch.bfloat16)
    low = model.bert.encoder.layer[0].attention.self.query.weight
    t, watch = watched(model, low, args(tmp_path, **NO_BACKWARD, **kw))
    out = t.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert {phase for phase, _, _ in watch.rows} == {Phase.WARMUP, Phase.FULL, Phase.PREDICT, Phase.CORRECT}
    assert all(dtype == low.dtype and moved for _, dtype, moved in watch.rows)
    assert all(x.dtype in (torch.float32, torch.uint8, torch.int8)
               for k, x in t.vsa.tracker.predictor.state_dict().items() if isinstance(x, torch.Tensor) and k != "skipped")


def fp16_trainer(model, trainer_args, init_scale, autocast):
    """A VSATrainer with fp16=True whose Accelerator is put in the state it takes on a GPU: native
    AMP with a GradScaler (on CPU accelerate runs fp16=True as plain fp32, with no scaler). The
    Trainer's own code then scales the loss, unscales before clipping and skips overflow steps."""
    t = VSATrainer(model=model, args=trainer_args, train_dataset=make_dataset(512))
    acc = t.accelerator
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=5)
    if not autocast:  # loss scaling alone, fp32 compute: scaling by powers of 2 is exact
        acc.autocast_handler = AutocastKwargs(enabled=False)
    return t


@pytest.mark.parametrize("config", ["no_backward", "default", "accumulation", "ternary_accumulation"])
def test_fp16_loss_scaling_leaves_the_trajectory_unchanged(tmp_path, config):
    # Under fp16 the gradients that backward leaves in .grad are multiplied by the scaler's scale:
    # records must be unscaled and predictions scaled, or predicted steps are off by the scale
    # (65536 at the end here). SGD, so that a wrong scale moves the weights (Adam would hide it).
    kw = dict(SCHEDULE, optim="sgd", learning_rate=0.05)
    kw.update({"no_backward": NO_BACKWARD, "default": {}, "accumulation": dict(gradient_accumulation_steps=2),
               "ternary_accumulation": dict(NO_BACKWARD, gradient_accumulation_steps=2,
                                            vsa_ternary_accumulation=True)}[config])
    plain = make_model()
    reference = VSATrainer(model=plain, args=args(tmp_path / "fp32", **kw), train_dataset=make_dataset(512))
    reference.train()
    model = make_model()
    t = fp16_trainer(model, args(tmp_path / "fp16", fp16=True, **kw), 2.0 ** 12, autocast=False)
    t.train()
    assert t.accelerator.scaler.get_scale() == 2.0 ** 16  # grown 4 times: no step was skipped
    assert t.vsa.phases == reference.vsa.phases and "PREDICT" in t.vsa.phases
    for (n, x), y in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(x, y), n


def test_fp16_overflow_steps_are_skipped_and_never_recorded(tmp_path, caplog):
    # Real fp16 autocast and a loss scale far too large: the first backward passes overflow, the
    # scaler skips those optimizer steps and lowers its scale, and hf_vsa records none of those
    # gradients (counted, also across the end of the probe, which starts a new history).
    model = make_model()
    dtypes = set()
    model.classifier.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    t = fp16_trainer(model, args(tmp_path, fp16=True, **SCHEDULE), 2.0 ** 40, autocast=True)
    t.train()
    assert dtypes == {torch.float16}
    assert t.accelerator.scaler.get_scale() < 2.0 ** 30
    assert t.vsa.phases.count("PREDICT") > 0
    # the scale needs several halvings before a backward stays finite; each non-finite gradient is
    # recorded as zeros, decided on the device (no host sync), and counted
    assert t.vsa.stats()["vsa/nonfinite_records_skipped"] >= 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_leaves_the_trajectory_unchanged(tmp_path, reentrant):
    # Recomputing activations in backward (the usual memory saver for LLM fine-tuning) must not
    # change what partial backward, DropBP's skipped blocks and the predictor see: same weights,
    # bit for bit, with either kind of torch checkpoint.
    weights = {}
    for on in (False, True):
        model = make_model()
        ckpt = dict(activation_checkpointing=on, activation_checkpointing_kwargs={"use_reentrant": reentrant})
        t = VSATrainer(model=model, args=args(tmp_path / str(on), **ckpt, **SCHEDULE),
                       train_dataset=make_dataset(512))
        t.train()
        assert model.is_activation_checkpointing == on
        assert t.vsa.phases.count("PREDICT") > 0
        weights[on] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))


def test_torch_compile_runs_the_schedule_and_predict_steps_update(tmp_path):
    # torch_compile=True: the Trainer compiles the model; the partial backward toggles requires_grad and
    # DropBP's hooks switch grad mode inside the forward, which recompile (a few times) but must run.
    model = make_model()
    head = model.classifier.weight  # an exact tensor: it moves on every step, PREDICT steps included
    t, watch = watched(model, head, args(tmp_path, torch_compile=True, max_steps=14, **SCHEDULE))
    t.train()
    assert t.vsa.phases == expected_phases(14, **SCHEDULE)
    assert Phase.PREDICT in {phase for phase, _, _ in watch.rows}
    assert all(moved for _, _, moved in watch.rows)


def test_dropbp_predict_steps_compute_exactly_the_kept_blocks(tmp_path):
    # vsa_block_drop=0.5 with only the head exact: on each PREDICT step the drawn blocks skip their
    # backward (their tensors see no backward at all), the kept ones and the dense embeddings get
    # theirs; backprop steps compute everything. Counted with autograd hooks, not our counters.
    model = make_model()
    bert = model.bert
    probes = [bert.encoder.layer[0].attention.self.query.weight, bert.encoder.layer[1].output.dense.weight,
              bert.embeddings.position_embeddings.weight, bert.embeddings.word_embeddings.weight]
    counters = [BackwardCounter(p) for p in probes]
    rows = []

    class Grab(TrainerCallback):
        def on_step_end(self, *a, **kw):
            rows.append((t.vsa.phase, set(t.vsa.computed), set(t.vsa.tracker.sparse)))

    t = VSATrainer(model=model, args=args(tmp_path, max_steps=40, vsa_exact_fraction=0.1, vsa_block_drop=0.5,
                                          vsa_whole_step=False, **SCHEDULE),
                   train_dataset=make_dataset(512), callbacks=[*counters, Grab()])
    t.train()
    e = t.vsa
    assert e.blocks == list(bert.encoder.layer)
    index = [next(i for i, q in enumerate(e.params) if q is p) for p in probes]
    kept = [[] for _ in probes]
    for k, (phase, computed, sparse) in enumerate(rows):
        for j, (c, i) in enumerate(zip(counters, index)):
            if phase is not Phase.PREDICT:
                assert c.per_step[k] == 1
                continue
            assert c.per_step[k] == (i in computed)
            assert all(set(b) <= computed or not set(b) & computed for b in e.block_tensors)  # whole blocks
            kept[j].append(i in computed)
    assert all(True in k and False in k for k in kept[:2])  # each block both kept and skipped
    assert all(kept[2])  # the position embeddings: dense, outside the blocks
    if index[3] in rows[-1][2]:  # vsa_skip_sparse dropped the word embeddings: never computed
        assert not any(kept[3])


def dropbp_run(tmp_path, data, **kw):
    """A DropBP run (head exact, both BERT blocks droppable, no dropout); per step of the PREDICT
    blocks but their CORRECT steps: the phase, the drop probabilities in use, the groups' measured
    consistency before the step and the tensors computed."""
    model = make_model()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the same batch then gives the same gradient, up to the weights' change
    rows, seen = [], []  # seen: every step's consistency before it

    class Grab(TrainerCallback):
        before = None

        def on_step_begin(self, *a, **kw):  # what the step's decisions read (the engine is built at step 1)
            self.before = None if t.vsa is None else t.vsa.consistency.mean.clone()

        def on_step_end(self, *a, **kw):
            e = t.vsa
            before = e.consistency.mean.clone() if self.before is None else self.before
            rows.append((e.phase, list(e.drop), before, set(e.computed), e.controller.block))
            seen.append(before)

    # (DropBP's partial steps on every PREDICT step: no whole-step PREDICT here)
    t = VSATrainer(model=model, args=args(tmp_path, **{**dict(max_steps=40, vsa_exact_fraction=0.1,
                                                              vsa_block_drop=0.5, vsa_whole_step=False,
                                                              **{**SCHEDULE, "vsa_adaptive_block_drop": True}),
                                                        **kw}),
                   train_dataset=data, callbacks=[Grab()])
    t.train()
    dropbp_run.seen = seen
    return t.vsa, [r[:4] + (k,) for k, r in enumerate(rows) if r[4] is Phase.PREDICT and r[0] is not Phase.CORRECT]


def test_where_every_block_carries_the_same_signal_predict_steps_back_off_to_backprop(tmp_path):
    # The same batch at every step and a tiny learning rate: consecutive gradients are alike, every
    # group's measured consistency is ~1, so no block has less signal per unit of cost than the step:
    # no block is dropped, and the PREDICT blocks' steps run the full backward (recorded, FULL) while
    # their CORRECT steps go on measuring.
    same = make_dataset(1).select([0] * 64)
    e, predict = dropbp_run(tmp_path, same, learning_rate=1e-6)
    assert predict
    for phase, drop, consistency, computed, _ in predict[2:]:  # (the first block: before any measurement)
        assert consistency.min() > 0.99
        assert drop == [0.0, 0.0] and phase is Phase.FULL
    assert e.controller.counts["CORRECT"] > 0 and e.tracker.corrections > 0
    assert e.stats()["vsa/backward_fraction"] > sum(p is Phase.PREDICT for p, *_ in predict) / 40
    # Off: the configured probability, whatever the measurement; blocks are skipped.
    e, predict = dropbp_run(tmp_path, same, learning_rate=1e-6, vsa_block_drop=0.5, vsa_adaptive_block_drop=False)
    assert all(drop == [0.5, 0.5] and phase is Phase.PREDICT for phase, drop, *_ in predict)
    assert any(not set(b) <= computed for _, _, _, computed, _ in predict for b in e.block_tensors)


def test_block_drop_probabilities_follow_the_measured_consistency(tmp_path):
    # Ordinary data: each PREDICT block draws against drop_probabilities of each group's running
    # lag-1 gradient cosine, measured on the backprop steps before it (unchanged during the block);
    # a block whose probabilities are all 0 runs backprop steps instead.
    e, predict = dropbp_run(tmp_path, make_dataset(512))
    assert e.consistency.measured > 0 and len(e.consistency.mean) == len(e.blocks) + 1  # the exact group last
    starts = [r for i, r in enumerate(predict) if i == 0 or r[1] != predict[i - 1][1]]  # (refreshed at block starts)
    for phase, drop, consistency, _, k in starts:
        # read without a host sync: the rates posted at the end of the backprop step before the last one
        assert drop == drop_probabilities(dropbp_run.seen[k - 1], 0.5, e.group_sizes).tolist()
    assert all((phase is Phase.PREDICT) == (max(drop) > 0) for phase, drop, *_ in predict)
    assert len({tuple(c.tolist()) for _, _, c, *_ in predict}) > 1  # refreshed as the measurement moves
    assert all(0.0 <= d <= 0.5 for _, drop, *_ in predict for d in drop)
    assert any(max(drop) > 0 for _, drop, *_ in predict) and any(max(drop) == 0 for _, drop, *_ in predict)


def test_each_train_call_with_model_init_runs_the_schedule_on_its_new_model(tmp_path):
    # model_init (what hyperparameter_search uses) gives every train() call a new model: the engine
    # must follow it, restart the schedule with the Trainer's step count, and leave no hook behind.
    class Watch(TrainerCallback):
        def __init__(self):
            self.runs = []

        def on_train_begin(self, *a, model=None, **kw):
            self.runs.append([])
            self.n = 0
            model.bert.embeddings.position_embeddings.weight.register_post_accumulate_grad_hook(
                lambda p: setattr(self, "n", self.n + 1))

        def on_step_end(self, *a, **kw):
            self.runs[-1].append(self.n)
            self.n = 0

    watch = Watch()
    t = VSATrainer(model_init=lambda: make_model(), args=args(tmp_path, **NO_BACKWARD), train_dataset=make_dataset(512),
                   callbacks=[watch])
    weights, models = [], []
    for _ in range(2):
        t.train()
        models.append(t.model)
        weights.append([p.detach().clone() for p in t.model.parameters()])
        assert t.vsa.phases == expected_phases(24, **SCHEDULE)
        assert t.vsa.params[0] is next(t.model.parameters())
    assert models[0] is not models[1]
    phases = expected_phases(24, **SCHEDULE)
    assert watch.runs[0] == watch.runs[1] == [0 if p == "PREDICT" else 1 for p in phases]
    assert all(torch.equal(a, b) for a, b in zip(*weights))  # same seed, same data: the same run
    for m in models:
        assert not any(b._forward_hooks or b._forward_pre_hooks for b in m.bert.encoder.layer)


def test_a_second_train_call_starts_a_new_schedule_on_the_same_model(tmp_path):
    # Without model_init the Trainer trains the same model again from step 0: so does the engine
    # (a fresh WARMUP, not the rest of the last run's cycle), and DropBP's hooks are not doubled.
    model = make_model()
    t = VSATrainer(model=model, args=args(tmp_path, max_steps=14, vsa_block_drop=0.5, **SCHEDULE),
                   train_dataset=make_dataset(512))
    t.train()
    first = t.vsa
    t.train()
    assert t.vsa is not first
    assert t.vsa.phases == expected_phases(14, **SCHEDULE)
    assert t.vsa.blocks and not any(b._forward_hooks or b._forward_pre_hooks for b in t.vsa.blocks)


def test_auto_find_batch_size_retry_after_out_of_memory_starts_a_new_schedule(tmp_path):
    # An out-of-memory error in the middle of a partial PREDICT step: the Trainer retries the whole
    # loop with a smaller batch from step 0; the engine restarts with it, and the failed step left
    # no frozen tensor and no grad mode switched off behind.
    model = make_model()
    raised = []

    def oom(module, inputs):
        if not raised and t.vsa is not None and t.vsa.phase is Phase.PREDICT and t.state.global_step >= 7:
            raised.append(t.state.global_step)
            raise RuntimeError("CUDA out of memory.")  # what accelerate's should_reduce_batch_size looks for
    model.bert.encoder.layer[1].register_forward_pre_hook(oom)
    t = VSATrainer(model=model, args=args(tmp_path, max_steps=14, auto_find_batch_size=True, vsa_block_drop=0.5,
                                          **SCHEDULE), train_dataset=make_dataset(512))
    t.train()
    assert raised and t._train_batch_size < 8  # the retry ran with a smaller batch
    assert t.vsa.phases == expected_phases(14, **SCHEDULE)  # not the failed loop's cycle continued
    assert all(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled()
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.bert.encoder.layer[:1])  # (1: the oom hook)


def test_one_process_on_several_gpus_is_refused_with_the_ddp_alternative(tmp_path):
    # The Trainer would wrap the model in DataParallel (threads over replicas); VSATrainer says how
    # to launch instead. (A CPU machine stands in for a 2-GPU one by its argument's device count.)
    a = args(tmp_path)
    a._n_gpu = 2
    with pytest.raises(ValueError, match=r"DataParallel.*n_gpu=2.*accelerate launch --multi_gpu"):
        VSATrainer(model=make_model(), args=a, train_dataset=make_dataset(32))
    a.vsa_enabled = False
    VSATrainer(model=make_model(), args=a, train_dataset=make_dataset(32))  # the plain Trainer's behaviour


@pytest.mark.parametrize("gate", ["default", "open"])
def test_a_tensor_a_callback_freezes_mid_run_stays_frozen_and_unchanged(tmp_path, gate):
    # Gradual freezing from a callback: partial PREDICT steps freeze and restore tensors around their
    # backward, and must restore the user's choice, not requires_grad=True; an open gate must not
    # write a predicted gradient into the frozen tensor either.
    model = make_model()
    frozen = model.bert.encoder.layer[0].attention.self.query.weight
    seen = {}

    class Freeze(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 6:
                frozen.requires_grad_(False)
                seen["at"] = frozen.detach().clone()

    extra = dict(vsa_min_cosine=-1.0) if gate == "open" else {}
    t = VSATrainer(model=model, args=args(tmp_path, vsa_block_drop=0.5, **SCHEDULE, **extra),
                   train_dataset=make_dataset(512), callbacks=[Freeze()])
    t.train()
    assert "PREDICT" in t.vsa.phases[6:] and not frozen.requires_grad
    assert torch.equal(frozen, seen["at"])


class ForwardCounter(TrainerCallback):
    """Forward calls of the model per optimizer step (a forward pre-hook; no counter of ours)."""

    def __init__(self, model):
        self.calls, self.per_step = 0, []
        model.register_forward_pre_hook(lambda m, a: setattr(self, "calls", self.calls + 1))

    def on_step_end(self, args, state, control, **kw):
        self.per_step.append(self.calls)
        self.calls = 0


def test_measured_noise_decides_whole_step_predict_and_the_micro_batches_each_step_computes(tmp_path):
    # The defaults with gradient accumulation 4: the noise scale is measured from the micro-batch
    # gradients. Whole-step PREDICT steps run no forward and no backward on any micro-batch; every
    # other step runs exactly the micro-batches adaptive accumulation chose: all 4 until two steps
    # have measured the noise scale, then fewer, WARMUP included (a batch ramp from measurement).
    model = make_model()
    fwd, bwd = ForwardCounter(model), BackwardCounter(model.bert.embeddings.word_embeddings.weight)
    run = []

    class Grab(TrainerCallback):
        def on_step_end(self, *a, **kw):
            run.append((t.vsa.phase, t.vsa.micro.run, t.vsa.whole))

    # One label for every example: a gradient with a strong mean, so the measurements have
    # something to find (the noise scale is a fraction of the batch; predictions follow it).
    data = make_dataset(2048).map(lambda row: {"labels": 1})
    # (two CORRECT steps per PREDICT block: the whole-step test needs two measurements that agree; the
    # predictions here are worth ~0.85 of a backward, which a tolerance of 20% more steps admits)
    # (decisions read the values posted two backprop steps before: the ramp starts at the fourth WARMUP step)
    sched = {**SCHEDULE, "vsa_correct_every": 2, "vsa_warmup_steps": 5}
    t = VSATrainer(model=model, args=args(tmp_path, gradient_accumulation_steps=4, max_steps=40, vsa_tolerance=0.2,
                                          **sched),
                   train_dataset=data, callbacks=[fwd, bwd, Grab()])
    t.train()
    e = t.vsa
    assert e.whole_steps, "the measured predictability never called for whole-step PREDICT"
    assert any(m < 4 for p, m, w in run if p is not Phase.PREDICT), "adaptive accumulation never skipped"
    warmup = [m for p, m, w in run if p is Phase.WARMUP]
    assert warmup[:3] == [4, 4, 4] and any(m < 4 for m in warmup[3:]), warmup
    for k, (phase, micro, whole) in enumerate(run):
        if k in e.whole_steps:
            assert phase is Phase.PREDICT and whole and fwd.per_step[k] == 0 and bwd.per_step[k] == 0
        else:
            assert fwd.per_step[k] == micro >= 1
            if phase is not Phase.PREDICT:
                assert bwd.per_step[k] == micro
    logged = [h for h in t.state.log_history if "vsa/noise_scale" in h]
    assert logged and all(h["vsa/micro_batches"] in (2, 3, 4) for h in logged)


def test_one_gradient_per_step_never_runs_whole_step_predict(tmp_path):
    # The same strongly predictable run as above, but one micro-batch per step: kappa is then only the
    # lag-1 cosine, biased low by the mean's drift, and whole-step PREDICT is not decided from it,
    # however well the predictions measure.
    from hf_vsa.policy import whole_step_pays
    data = make_dataset(2048).map(lambda row: {"labels": 1})
    sched = {**SCHEDULE, "vsa_correct_every": 2}
    t = VSATrainer(model=make_model(), args=args(tmp_path, max_steps=40, vsa_tolerance=0.2, **sched),
                   train_dataset=data)
    t.train()
    e = t.vsa
    assert e.noise.lag1 is not None and len(e.tracker.worth) >= 2
    assert whole_step_pays(e.tracker.worth, e.kappa, e.controller.predict_share, 0.2)  # the measurements alone would
    assert not e.whole_steps and not e.whole


@pytest.mark.parametrize("mode", ["coast", "skip"])
def test_the_controls_give_predict_steps_a_zero_gradient_or_no_update(tmp_path, mode):
    # The sceptic's controls: on PREDICT steps (no backward here), 'coast' writes zeros, so AdamW still
    # moves each tensor on its momentum; 'skip' writes nothing, so nothing moves. Backprop steps train as usual.
    model = make_model()
    low = model.bert.encoder.layer[0].attention.self.query.weight
    t, watch = watched(model, low, args(tmp_path, vsa_predict_mode=mode, **NO_BACKWARD))
    t.train()
    predict = [(dtype, moved) for phase, dtype, moved in watch.rows if phase is Phase.PREDICT]
    assert predict and all(moved for phase, _, moved in watch.rows if phase is not Phase.PREDICT)
    if mode == "coast":
        assert all(dtype == low.dtype and moved for dtype, moved in predict)
    else:
        assert all(dtype is None and not moved for dtype, moved in predict)


def test_a_bad_predict_mode_is_refused_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="vsa_predict_mode must be one of"):
        args(tmp_path, vsa_predict_mode="zero")


def test_a_non_finite_gradient_at_a_correct_step_measures_nothing(tmp_path):
    """An fp16-style overflow (an inf gradient) at a CORRECT step leaves the gate's running cosines as they
    were, instead of counting a cosine of 0 that could retire tensors."""
    model = make_model()
    w = model.bert.encoder.layer[0].attention.self.query.weight
    seen = []

    class Poison(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            e = t.vsa
            poison = e is not None and e.controller.counts["CORRECT"] == 1 and e.phase is Phase.PREDICT
            self.hook = w.register_hook(lambda g: g * float("inf")) if poison else None
            self.before = None if e is None else e.tracker.tensor_cosine.clone()

        def on_step_end(self, *a, **kw):
            if self.hook is not None:
                self.hook.remove()
            if t.vsa.phase is Phase.CORRECT and self.before is not None:
                seen.append((self.hook is not None, torch.equal(self.before, t.vsa.tracker.tensor_cosine)))

    # the second CORRECT step (after one that measured) gets the inf gradient if it follows a PREDICT step
    t = VSATrainer(model=model, args=args(tmp_path, max_steps=16, max_grad_norm=0.0, **NO_BACKWARD),
                   train_dataset=make_dataset(512), callbacks=[Poison()])
    t.train()
    assert (False, False) in seen  # an ordinary CORRECT step moves the running cosines
    assert (True, True) in seen  # the poisoned one leaves them


def test_exact_gradients_missing_on_this_rank_are_zero_filled_for_the_all_reduce(tmp_path):
    t = VSATrainer(model=make_model(), args=args(tmp_path, max_steps=1, **SCHEDULE), train_dataset=make_dataset(64))
    t.train()
    e = t.vsa
    e.computed = set(e.exact)
    for i in e.exact:
        e.params[i].grad = None  # this rank's batch reached none of them
    grads = e.exact_grads()
    assert len(grads) == len(e.exact) and all(torch.count_nonzero(g) == 0 for g in grads)


def test_the_whole_steps_preset_predicts_whole_steps_with_no_forward_and_no_backward(tmp_path):
    """vsa_preset='whole_steps' (the benchmark's predict_all, measured to pay on SmolLM2 LoRA): the fixed
    schedule, and on its PREDICT steps neither a forward nor a backward, while the AR prediction still moves
    the weights."""
    model = make_model()
    param = next(p for p in model.parameters() if p.requires_grad)
    counter = BackwardCounter(param)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    moved = []

    class Moves(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.before = param.detach().clone()

        def on_step_end(self, args, state, control, **kw):
            moved.append(not torch.equal(self.before, param.detach()))

    t = VSATrainer(model=model, args=args(tmp_path, max_steps=40, vsa_preset="whole_steps", logging_steps=1000),
                   train_dataset=make_dataset(512, seed=0), callbacks=[counter, Moves()])
    t.train()
    phases = t.vsa.phases
    schedule = expected_phases(40, vsa_warmup_steps=10, vsa_full_steps=5, vsa_predict_steps=20, vsa_correct_every=5,
                               vsa_history_window=t.args.vsa_history_window)
    assert phases == schedule and t.args.vsa_predictor == "ar"
    predicted = [i for i, ph in enumerate(phases) if ph == "PREDICT"]
    assert len(predicted) >= 10
    assert all(counter.per_step[i] == 0 for i in predicted)  # no backward
    assert len(forwards) == len(phases) - len(predicted)  # no forward
    assert all(moved[i] for i in predicted)  # the prediction updated the weights
