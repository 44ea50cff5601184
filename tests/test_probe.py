"""The probe: the predictor measures a flat sample of the model before any tensor gets a full history,
and the tensors get one only where the prediction is measured to beat the zero gradient."""
import pytest
import torch
from transformers import TrainerCallback

from conftest import Probe, make_dataset, make_model
from hf_vsa import GradientPredictor, Phase, VSATrainer, VSATrainingArguments
from hf_vsa.probe import MIN_ELEMENTS

# (DropBP at its configured rate: the tiny model's blocks carry alike signal, so the measured rate
# would back PREDICT steps off to backprop; tests of that pass vsa_adaptive_block_drop=True)
SCHEDULE = dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                vsa_correct_every=3, vsa_adaptive_phases=False, vsa_block_drop=0.5, vsa_adaptive_block_drop=False)
SAMPLED = dict(SCHEDULE)


def test_the_probe_is_one_flat_tensor_of_fixed_windows():
    big, small = torch.zeros(64, 1024), torch.zeros(100)
    probe = Probe([big, small], fraction=1 / 16, seed=0)
    assert len(probe.stand_ins) == 1 and probe.stand_ins[0].numel() == MIN_ELEMENTS + 100  # small: whole
    g = [torch.arange(big.numel(), dtype=torch.float32).view_as(big), torch.ones(100)]
    x = probe.sample(g)[0]
    # The big tensor's sample: contiguous runs of its elements, scaled by sqrt(numel / sampled).
    scale = (big.numel() / MIN_ELEMENTS) ** 0.5
    raw = x[:MIN_ELEMENTS] / scale
    assert torch.all(raw.round() == raw) and int((raw[1:] - raw[:-1] != 1).sum()) <= 3  # 4 windows
    assert torch.equal(x[MIN_ELEMENTS:], torch.ones(100))
    again = Probe([big, small], fraction=1 / 16, seed=0).sample(g)[0]
    other = Probe([big, small], fraction=1 / 16, seed=1).sample(g)[0]
    assert torch.equal(x, again) and not torch.equal(x, other)  # from the seed alone
    assert torch.equal(probe.sample([None, None])[0], torch.zeros_like(x))  # no gradient: zeros


def test_the_probe_measures_the_cosine_the_full_model_would():
    """The model's prediction cosine measured on a 1/16 sample matches the one measured on the whole
    tensors, from predictions that are poor, fair and good."""
    gen = torch.Generator().manual_seed(0)
    n = 1 << 16
    params = [torch.zeros(n) for _ in range(3)]
    for noise in (8.0, 1.0, 0.1):
        base = [torch.randn(n, generator=gen) for _ in range(3)]

        def grads():
            return [b + noise * torch.randn(n, generator=gen) for b in base]

        probe = Probe(params, fraction=1 / 16, seed=0)
        full, sampled = (GradientPredictor(ps, compression="ternary", window=4) for ps in (params, probe.stand_ins))
        for t in range(4):
            g = grads()
            full.record(g, t)
            sampled.record(probe.sample(g), t)
        g = grads()
        whole, part = full.correct(g, 4)[0], sampled.correct(probe.sample(g), 4)[0]
        assert abs(whole - part) < 0.03, (noise, whole, part)


class StepLog(TrainerCallback):
    """Per optimizer step, at the optimizer step: phase, whether the engine probes, whether the prediction
    has earned its place, the elements the predictor tracks, and which tensors hold a predicted gradient."""

    def __init__(self):
        self.rows, self.trainer = [], None

    def on_pre_optimizer_step(self, *a, **kw):
        e = self.trainer.vsa
        predicted = [i for i in set(e.tracker.tracked) - e.computed if e.params[i].grad is not None]
        self.rows.append(dict(phase=e.phase, probing=e.tracker.probing, earned=e.tracker.earned(),
                              elements=e.tracker.windows.numel, sampled=sum(e.tracker.windows.lengths),
                              predicted=predicted if e.phase is Phase.PREDICT else None,
                              state=e.tracker.state_memory_ratio()))


def run(tmp_path, data=512, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
                logging_steps=5, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    log = StepLog()
    log.trainer = VSATrainer(model=make_model(), args=VSATrainingArguments(**{**base, **kw}),
                             train_dataset=make_dataset(data), callbacks=[log])
    log.trainer.train()
    return log.trainer, log.rows


# The whole data set in every batch and a small step: each gradient nearly repeats the last, so the
# prediction beats the zero gradient. Batches of 8 of 512 at a large step: it does not.
PREDICTABLE = dict(data=32, per_device_train_batch_size=32, learning_rate=1e-5)
NOISY = dict(per_device_train_batch_size=2, learning_rate=3e-2)


def test_full_histories_start_once_the_prediction_beats_the_zero_gradient(tmp_path):
    t, rows = run(tmp_path, vsa_min_cosine=-0.99, vsa_retire_after=0, **SAMPLED, **PREDICTABLE)
    e = t.vsa
    roomy, _ = run(tmp_path / "roomy", vsa_min_cosine=-0.99, vsa_retire_after=0, vsa_state_budget=100.0, **SAMPLED,
                   **PREDICTABLE)
    assert len(roomy.vsa.tracker.tracked) > len(e.tracker.tracked)  # a larger budget tracks more
    switch = next(k for k, r in enumerate(rows) if not r["probing"])
    assert rows[switch]["phase"] is Phase.FULL and rows[switch - 1]["phase"] is not Phase.FULL
    assert rows[switch - 1]["earned"] and all(r["probing"] for r in rows[:switch])
    assert not any(r["probing"] for r in rows[switch:])
    # one flat sample (the tiny model's tensors are all small: whole), then the tensors themselves
    # (each tensor's part padded to whole compression blocks)
    assert rows[switch - 1]["elements"] == Probe(e.params, 1 / 64, 0, align=e.args.vsa_compression_block).windows.numel
    assert rows[switch]["sampled"] == sum(e.params[i].numel() for i in e.tracker.tracked)
    # the tensors whose prediction beat the zero gradient on the probe, best first, while they fit the budget
    tracked = e.tracker.tracked
    assert tracked and all(e.tracker.gain_host[i] > 0 for i in tracked)
    assert 4 * max(r["state"] for r in rows[switch:]) <= e.args.vsa_state_budget  # (state: over fp32 bytes)
    # No prediction while probing, though the gate admits; from the full history's first PREDICT block on, some.
    assert all(r["predicted"] == [] for r in rows[:switch] if r["predicted"] is not None)
    assert any(r["predicted"] for r in rows[switch:] if r["predicted"] is not None)


def test_no_full_history_where_the_prediction_does_not_beat_the_zero_gradient(tmp_path):
    t, rows = run(tmp_path, vsa_min_cosine=-0.99, vsa_retire_after=0, **SAMPLED, **NOISY)
    assert t.vsa.tracker.corrections >= 3 and t.vsa.tracker.earn  # measured...
    assert all(r["probing"] and not r["earned"] for r in rows)  # ...and never earned: no full history
    assert all(r["predicted"] == [] for r in rows if r["predicted"] is not None)  # PREDICT steps: no update


def test_the_probe_costs_a_fraction_of_the_full_state(tmp_path):
    """A GPT-2 whose matrices exceed the probe's minimum: its state is a small fraction of the full one."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from test_counting import data

    def state(**kw):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=128, n_layer=2, n_head=2))
        a = VSATrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                                 report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                 **{**SAMPLED, **kw})
        t = VSATrainer(model=model, args=a, train_dataset=data())
        t.train()
        return t.vsa.tracker.probing, t.vsa.tracker.peak_state_ratio, t.vsa.tracker.windows.numel

    (probing, probed, sampled), (_, full, whole) = state(), state(vsa_probe_fraction=0.0)
    # the same state per element: the probe costs its sample's share (here 10%: 4096 elements of each matrix)
    assert probing and sampled < 0.11 * whole and 0 < probed <= 1.01 * full * sampled / whole


@pytest.mark.parametrize("kw", [dict(vsa_probe_fraction=0.0), dict(vsa_min_cosine=-1.0), dict(vsa_preset="sketch")],
                         ids=["fraction_0", "gate_off", "sketch"])
def test_no_probe_without_a_fraction_or_a_gate(tmp_path, kw):
    t, rows = run(tmp_path, max_steps=6, **{**SAMPLED, **kw})
    w = t.vsa.tracker.windows  # the tracked tensors whole, from the start
    assert not any(r["probing"] for r in rows) and t.vsa.tracker.tracked
    assert all(w.lengths[i] == t.vsa.params[i].numel() for i in t.vsa.tracker.tracked)


def test_without_full_blocks_the_probe_ends_at_the_next_predict_block(tmp_path):
    t, rows = run(tmp_path, vsa_min_cosine=-0.99, vsa_retire_after=0, **dict(SAMPLED, vsa_full_steps=0),
                  **PREDICTABLE)
    switch = next(k for k, r in enumerate(rows) if not r["probing"])
    assert rows[switch]["phase"] is Phase.PREDICT and rows[switch - 1]["phase"] is Phase.PREDICT
    # The full history is empty at the switch: no update from it until a CORRECT step has recorded.
    first_record = next(k for k in range(switch, len(rows)) if rows[k]["phase"] is Phase.CORRECT)
    assert all(r["predicted"] == [] for r in rows[:first_record] if r["predicted"] is not None)
    assert any(r["predicted"] for r in rows[first_record:] if r["predicted"] is not None)


def test_only_the_named_modules_get_a_full_history(tmp_path):
    t, rows = run(tmp_path, vsa_min_cosine=-0.99, vsa_retire_after=0, vsa_state_budget=100.0,
                  vsa_track_modules=["attention.self"], **SAMPLED, **PREDICTABLE)
    e = t.vsa
    assert not e.tracker.probing and e.tracker.tracked
    assert all("attention.self" in e.names[i] for i in e.tracker.tracked)


def test_bad_tracking_arguments_are_refused_naming_them(tmp_path):
    with pytest.raises(ValueError, match="vsa_state_budget must be > 0"):
        VSATrainingArguments(output_dir=str(tmp_path), vsa_state_budget=0)
    with pytest.raises(ValueError, match="vsa_track_modules must be a list"):
        VSATrainingArguments(output_dir=str(tmp_path), vsa_track_modules="mlp")
