"""The probe: the predictor measures a sample of each tensor before any tensor gets a full history."""
import pytest
import torch
from transformers import TrainerCallback

from conftest import make_dataset, make_model
from hf_vsa import GradientPredictor, Phase, VSATrainer, VSATrainingArguments
from hf_vsa.probe import MIN_BLOCKS, Probe, inclusion_probabilities, systematic_sample

# (DropBP at its configured rate: the tiny model's blocks carry alike signal, so the measured rate
# would back PREDICT steps off to backprop; tests of that pass vsa_adaptive_block_drop=True)
SCHEDULE = dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                vsa_correct_every=3, vsa_adaptive_phases=False, vsa_adaptive_block_drop=False)
# Blocks of 4 elements: the tiny model's 32x32 matrices have 256 blocks, so the probe samples them.
SAMPLED = dict(SCHEDULE, vsa_compression_block=4)


def test_inclusion_probabilities_follow_block_energy_and_sum_to_the_sample_size():
    energy = torch.tensor([100.0, 0.0, 1.0, 1.0, 0.0, 2.0, 0.0, 0.0])
    pi = inclusion_probabilities(energy, 3)
    assert torch.isclose(pi.sum(), torch.tensor(3.0, dtype=pi.dtype)) and bool((pi > 0).all()) and bool((pi <= 1).all())
    assert pi[0] == 1.0  # the heaviest block is certain
    assert pi[5] > pi[2] == pi[3] > pi[1] == pi[4]  # then by energy; zero-energy blocks keep a floor
    # Weights: half energy share, half uniform share (1/8). The certain block leaves 2 draws to the others.
    w0 = 0.5 * 100 / 104 + 0.5 / 8
    assert torch.isclose(pi[1], torch.tensor(2 * (0.5 / 8) / (1 - w0), dtype=pi.dtype))
    # Flat energy (or none) gives the uniform sample.
    for flat in (torch.ones(8), torch.zeros(8)):
        assert torch.allclose(inclusion_probabilities(flat, 3), torch.full((8,), 3 / 8, dtype=torch.float64))


def test_systematic_sampling_includes_each_block_with_its_probability():
    gen = torch.Generator().manual_seed(0)
    energy = torch.rand(40, generator=gen) ** 6  # heavy-tailed
    pi = inclusion_probabilities(energy, 8)
    counts = torch.zeros(40, dtype=torch.float64)
    for seed in range(3000):
        idx = systematic_sample(pi, 8, torch.Generator().manual_seed(seed))
        assert len(set(idx.tolist())) == 8 and torch.equal(idx, idx.sort().values)
        counts[idx] += 1
    assert torch.allclose(counts / 3000, pi, atol=0.035), (counts / 3000 - pi).abs().max()


def test_a_probe_draws_its_blocks_from_the_first_gradient_and_keeps_them():
    params = [torch.zeros(1000), torch.zeros(64), torch.zeros(30, 7)]
    probe = Probe(params, fraction=0.25, block=4, seed=1)
    assert probe.sizes == [63, None, MIN_BLOCKS]  # 64 blocks of 4 elements: whole; 52 blocks: at least 16
    assert probe.stand_ins[1] is params[1] and [x.numel() for x in probe.stand_ins] == [252, 64, 64]
    gen = torch.Generator().manual_seed(0)
    first = [torch.randn(1000, generator=gen), torch.randn(64, generator=gen), torch.randn(30, 7, generator=gen)]
    first[0][:40] *= 100  # ten heavy blocks at the start of the big tensor
    s = probe.sample(first)
    big, scale = probe.index[0], probe.scale[0]
    assert len(set(big.tolist())) == 63 and torch.equal(big, big.sort().values)
    assert set(range(10)) <= set(big.tolist()) and bool((scale[:10] == 1).all())  # certain: unscaled
    assert bool((scale[10:] > 1).all())  # the others stand for more than themselves
    assert torch.equal(s[0], (first[0].view(-1, 4)[big] * scale[:, None]).reshape(-1)) and s[1] is first[1]
    later = [torch.randn_like(g) for g in first]
    probe.sample(later)
    assert torch.equal(probe.index[0], big)  # drawn once
    again = Probe(params, 0.25, 4, seed=1)
    again.sample(first)
    assert torch.equal(again.index[0], big)
    other = Probe(params, 0.25, 4, seed=2)
    other.sample(first)
    assert not torch.equal(other.index[0], big)


def test_the_probe_measures_the_cosine_the_full_tensor_would():
    """Per-tensor prediction cosines measured on a 1/16 sample match those measured on the whole
    tensors, from predictions that are poor, fair and good."""
    gen = torch.Generator().manual_seed(0)
    n = 1 << 16
    base = [torch.randn(n, generator=gen) for _ in range(3)]
    noise = [8.0, 1.0, 0.1]  # per tensor: noise scale against a fixed gradient

    def grads():
        return [b + s * torch.randn(n, generator=gen) for b, s in zip(base, noise)]

    params = [torch.zeros(n) for _ in range(3)]
    probe = Probe(params, fraction=1 / 16, block=256, seed=0)
    full, sampled = (GradientPredictor(ps, compression="ternary", window=4) for ps in (params, probe.stand_ins))
    for t in range(4):
        g = grads()
        full.record(g, t)
        sampled.record(probe.sample(g), t)
    g = grads()
    whole = full.correct(g, 4)[2]
    part = sampled.correct(probe.sample(g), 4)[2]
    assert whole[0] < 0.2 < whole[1] < 0.8 < whole[2]
    assert torch.allclose(whole, part, atol=0.03), (whole, part)


def test_a_heavy_tailed_tensor_is_measured_by_its_heavy_blocks():
    """4 of 256 blocks hold most of the gradient's energy, and it is noise there (unpredictable); the
    other blocks are predictable. The whole tensor's cosine is low. A uniform 1/16 sample that misses
    the heavy blocks measures the predictable rest; the energy-weighted sample measures the tensor."""
    gen = torch.Generator().manual_seed(0)
    n, block = 1 << 16, 256
    base = torch.randn(n, generator=gen)

    def grad():
        g = base + 0.1 * torch.randn(n, generator=gen)
        g[2 * block:6 * block] = 20 * torch.randn(4 * block, generator=gen)  # heavy blocks 2-5: pure noise
        return g

    params = [torch.zeros(n)]
    weighted, uniform = Probe(params, 1 / 16, block, seed=0), Probe(params, 1 / 16, block, seed=0)
    uniform.draw([torch.ones(n)])  # flat energy: the uniform sample
    heavy = {2, 3, 4, 5}
    assert not heavy & set(uniform.index[0].tolist())  # (this seed's uniform sample misses them)
    preds = [GradientPredictor(ps, compression="ternary", window=4)
             for ps in (params, weighted.stand_ins, uniform.stand_ins)]
    views = (lambda x: x, weighted.sample, uniform.sample)
    for t in range(4):
        g = [grad()]
        for pred, view in zip(preds, views):
            pred.record(view(g), t)
    g = [grad()]
    whole, sampled, naive = (pred.correct(view(g), 4)[2][0].item() for pred, view in zip(preds, views))
    assert heavy <= set(weighted.index[0].tolist())  # drawn with certainty
    assert whole < 0.3 and abs(sampled - whole) < 0.05 and naive > 0.8, (whole, sampled, naive)


class StepLog(TrainerCallback):
    """Per optimizer step, at the optimizer step: phase, whether the engine probes, the elements the
    predictor tracks, the tensors it records, and which lower tensors hold a predicted gradient."""

    def __init__(self):
        self.rows, self.trainer = [], None

    def on_pre_optimizer_step(self, *a, **kw):
        e = self.trainer.vsa
        predicted = [i for i in set(e.predictor.active) - e.computed if e.params[i].grad is not None]
        self.rows.append(dict(phase=e.phase, probing=e.probe is not None, active=list(e.predictor.active),
                              elements=sum(e.predictor.params[i].numel() for i in e.predictor.active),
                              predicted=predicted if e.phase is Phase.PREDICT else None,
                              state=e.state_memory_ratio()))


def run(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
                logging_steps=5, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    log = StepLog()
    log.trainer = VSATrainer(model=make_model(), args=VSATrainingArguments(**{**base, **kw}),
                             train_dataset=make_dataset(512), callbacks=[log])
    log.trainer.train()
    return log.trainer, log.rows


def test_full_histories_start_at_the_first_full_block_after_a_measurement(tmp_path):
    # The gate admits every measured tensor and never retires one: the probe's measurements decide nothing
    # here, so what the probe changes is only what is tracked, and when predictions start.
    # (A fixed DropBP rate: the adaptive one skips few blocks of this tiny model, and only skipped blocks
    # take predictions.)
    t, rows = run(tmp_path, vsa_min_cosine=-0.99, vsa_retire_after=0, **SAMPLED)
    e = t.vsa
    first_correct = next(k for k, r in enumerate(rows) if r["phase"] is Phase.CORRECT)
    switch = next(k for k, r in enumerate(rows) if not r["probing"])
    assert rows[switch]["phase"] is Phase.FULL and rows[switch - 1]["phase"] is not Phase.FULL
    assert switch > first_correct and all(r["probing"] for r in rows[:switch])
    assert not any(r["probing"] for r in rows[switch:])
    total = sum(p.numel() for p in e.params)
    probed = rows[switch - 1]
    assert probed["elements"] < 0.5 * total  # the probe tracks samples of the big tensors...
    assert rows[switch]["elements"] == sum(e.params[i].numel() for i in probed["active"])  # ...then full tensors
    assert rows[switch]["active"] == probed["active"]
    # No prediction while probing, though the gate admits; from the full history's first PREDICT block on, some.
    assert all(r["predicted"] == [] for r in rows[:switch] if r["predicted"] is not None)
    assert any(r["predicted"] for r in rows[switch:] if r["predicted"] is not None)


def test_tensors_retired_while_probing_never_get_a_full_history(tmp_path):
    # A gate nothing passes: every probed tensor retires at the second CORRECT step, before the switch.
    t, rows = run(tmp_path, vsa_min_cosine=1.0, vsa_retire_after=2, vsa_skip_sparse=False,
                  **dict(SAMPLED, vsa_predict_steps=9))
    switch = next(k for k, r in enumerate(rows) if not r["probing"])
    assert rows[switch - 1]["active"] == [] and t.vsa.predictor.active == []
    assert t.vsa.predictor.params == t.vsa.params  # the full predictor exists, but tracks nothing
    assert max(r["state"] for r in rows[switch:]) == 0.0


def test_the_probe_costs_a_fraction_of_the_full_state(tmp_path):
    _, probed = run(tmp_path / "a", **SAMPLED, max_steps=10)
    _, full = run(tmp_path / "b", vsa_probe_fraction=0.0, **SAMPLED, max_steps=10)
    assert all(r["probing"] for r in probed) and not any(r["probing"] for r in full)
    assert 0 < max(r["state"] for r in probed) < 0.5 * max(r["state"] for r in full)


@pytest.mark.parametrize("kw", [dict(vsa_probe_fraction=0.0), dict(vsa_min_cosine=-1.0), dict(vsa_preset="sketch")],
                         ids=["fraction_0", "gate_off", "sketch"])
def test_no_probe_without_a_fraction_or_a_gate(tmp_path, kw):
    t, rows = run(tmp_path, max_steps=6, **{**SAMPLED, **kw})
    assert not any(r["probing"] for r in rows) and t.vsa.predictor.params == t.vsa.params


def test_without_full_blocks_the_probe_ends_at_the_next_predict_block(tmp_path):
    t, rows = run(tmp_path, vsa_min_cosine=-0.99, vsa_retire_after=0, **dict(SAMPLED, vsa_full_steps=0))
    switch = next(k for k, r in enumerate(rows) if not r["probing"])
    assert rows[switch]["phase"] is Phase.PREDICT and rows[switch - 1]["phase"] is Phase.PREDICT
    # The full history is empty at the switch: no update from it until a CORRECT step has recorded.
    first_record = next(k for k in range(switch, len(rows)) if rows[k]["phase"] is Phase.CORRECT)
    assert all(r["predicted"] == [] for r in rows[:first_record] if r["predicted"] is not None)
    assert any(r["predicted"] for r in rows[first_record:] if r["predicted"] is not None)
