"""The published anchors the benchmark compares with (scripts/anchors.py): DropBP as its authors publish it."""
import pytest
import torch
from transformers import TrainingArguments

from anchors import DropBPTrainer, allocate, branches
from conftest import BackwardCounter, make_dataset, make_model


def test_the_allocation_keeps_at_most_the_flops_budget_and_drops_the_least_sensitive_most():
    sens, flops = [4.0, 1.0, 3.0, 0.5, 2.0, 8.0], [2.0, 1.0, 1.0, 3.0, 2.0, 1.0]
    rates = allocate(sens, flops, 0.5 * sum(flops))
    assert sum((1 - r) * f for r, f in zip(rates, flops)) <= 0.5 * sum(flops) + 1e-9
    assert all(0.0 <= r <= 0.9 + 1e-9 and abs(r * 10 - round(r * 10)) < 1e-6 for r in rates)  # steps of 0.1
    assert rates[3] == pytest.approx(0.9) and rates[5] < rates[1]  # least sensitive dropped most
    assert allocate(sens, flops, sum(flops)) == [0.0] * 6  # no budget to meet: nothing dropped


def test_dropbp_skips_branch_backwards_at_the_measured_rates(tmp_path):
    model = make_model()
    found = branches(model)
    assert [k for k, _ in found] == ["attn", "mlp"] * (len(found) // 2) and found
    query = model.bert.encoder.layer[0].attention.self.query.weight  # inside an attention branch
    emb = model.bert.embeddings.word_embeddings.weight  # on the residual path: always a gradient
    counters = [BackwardCounter(query), BackwardCounter(emb)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    t = DropBPTrainer(model=model, args=args, train_dataset=make_dataset(256), callbacks=counters)
    assert t.rates == [0.5] * len(found)  # the target rate until the sensitivities are measured
    t.train()
    assert t.sensitivities is not None and len(t.sensitivities) == len(found)
    flops = [sum(p.numel() for p in m.parameters()) for _, m in found]
    assert sum((1 - r) * f for r, f in zip(t.rates, flops)) <= 0.5 * sum(flops) * 1.05  # (+ attention scores)
    q, e = counters
    # step 3 (10% of 30) measures with extra backwards; on the others the query runs its backward only
    # where its branch was kept, the embedding always
    steps = [k for k in range(30) if k != 3]
    assert all(e.per_step[k] == 1 for k in steps)
    kept = sum(q.per_step[k] for k in steps)
    assert 0 < kept < len(steps)
    assert torch.isfinite(torch.tensor(t.state.log_history[-1]["train_loss"]))


@pytest.fixture
def live_backward_flops(monkeypatch):
    """Every backward's FLOPs, counted while it runs (what backward_flops.py must reproduce after the run)."""
    from torch.utils.flop_counter import FlopCounterMode
    live, backward = [], torch.Tensor.backward

    def counted(self, *a, **kw):
        with FlopCounterMode(display=False) as fc:
            backward(self, *a, **kw)
        live.append(fc.get_total_flops())
    monkeypatch.setattr(torch.Tensor, "backward", counted)
    return live


@pytest.mark.parametrize("run", ["trainer", "dropbp", "whole_steps"])
def test_backward_flops_counted_after_a_run_are_those_its_backwards_ran(tmp_path, monkeypatch, live_backward_flops,
                                                                     run):
    # The benchmark notes each backward (its examples, DropBP's dropped branches) and counts the FLOPs
    # after the run: they equal what the backwards counted while they ran (DropBP: drops on most steps
    # and 1 + one per branch one-example sensitivity passes; hf_vsa's whole steps: none on PREDICT steps).
    from backward_flops import BackwardLog
    from hf_vsa import VSATrainer, VSATrainingArguments
    common = dict(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
                  report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    data = make_dataset(200)  # the last batch of the epoch is smaller
    if run == "whole_steps":
        args = VSATrainingArguments(**common, vsa_preset="whole_steps", vsa_warmup_steps=4, vsa_full_steps=2,
                                    vsa_predict_steps=6, vsa_correct_every=3)
        t = VSATrainer(model=make_model(), args=args, train_dataset=data)
    else:
        cls = DropBPTrainer if run == "dropbp" else __import__("transformers").Trainer
        t = cls(model=make_model(), args=TrainingArguments(**common), train_dataset=data)
    log = BackwardLog(t)
    t.train()
    monkeypatch.undo()  # the count after the run runs backwards of its own
    ran = len(live_backward_flops)
    assert ran and sum(log.events.values()) == ran
    assert log.total() == sum(live_backward_flops) > 0
    if run == "dropbp":
        assert len({dropped for _, dropped in log.events}) > 2  # the drops differ from step to step
    if run == "whole_steps":
        predicted = t.vsa.controller.counts.get("PREDICT", 0)
        assert predicted and ran == 30 - predicted
