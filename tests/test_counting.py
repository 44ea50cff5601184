"""What hf_vsa adds to a training step, counted (ops and host syncs), on real Trainer runs of a GPT-2
built from a config: it does not grow with the number of tensors, and no ordinary step syncs the host."""
import statistics
from unittest.mock import patch

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_vsa import VSATrainer, VSATrainingArguments
from hf_vsa import tracking
from hf_vsa.counting import count_training
from hf_vsa.flat import Deferred, Windows
from tasks import _lm_blocks

# A schedule that reaches every phase in 30 steps; a fixed DropBP rate so PREDICT steps run (partial backward).
SCHEDULE = dict(vsa_warmup_steps=4, vsa_full_steps=3, vsa_predict_steps=8, vsa_correct_every=3,
                vsa_block_drop=0.5, vsa_adaptive_block_drop=False)


def gpt2(layers):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=32, n_layer=layers, n_head=2))


def data():
    ids = torch.randint(0, 256, (512 * 16,), generator=torch.Generator().manual_seed(0)).tolist()
    return _lm_blocks(ids, 16, 4)[0]


def run(tmp_path, layers, vsa=True, **vsa_kw):
    kw = dict(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, gradient_accumulation_steps=2,
              learning_rate=1e-3, logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True,
              disable_tqdm=True, seed=0)
    if not vsa:
        return count_training(Trainer(model=gpt2(layers), args=TrainingArguments(**kw), train_dataset=data()))
    t = VSATrainer(model=gpt2(layers), args=VSATrainingArguments(**kw, **{**SCHEDULE, **vsa_kw}), train_dataset=data())
    return count_training(t)


def by_phase(rows):
    out = {}
    for phase, vsa_ops, _, vsa_syncs, _ in rows[1:]:  # (the first step builds the engine)
        out.setdefault(phase, []).append((vsa_ops, vsa_syncs))
    return out


def test_the_ops_hf_vsa_adds_do_not_grow_with_the_number_of_tensors(tmp_path):
    shallow, deep = by_phase(run(tmp_path / "a", 2)), by_phase(run(tmp_path / "b", 4))
    assert {"WARMUP", "FULL", "PREDICT", "CORRECT"} <= set(shallow) == set(deep)
    for phase in ("WARMUP", "FULL", "CORRECT"):
        a, b = (statistics.median(x[0] for x in d[phase]) for d in (shallow, deep))
        assert 0 < a and b <= 1.05 * a, (phase, a, b)  # 28 -> 52 tensors: the same ops
    trainer = statistics.median(r[1] + r[2] for r in run(tmp_path / "c", 4, vsa=False)[1:])
    assert statistics.median(x[0] for x in deep["FULL"]) <= 0.25 * trainer


def test_full_histories_cost_the_same_ops_whatever_the_number_of_tensors_and_no_sync(tmp_path):
    """Every tensor tracked in full from the start, the gate open, no exact tensors: PREDICT steps write
    the prediction of every tensor (no backward). One flat history: recording, comparing and predicting
    do not grow with the tensors."""
    full = dict(vsa_probe_fraction=0.0, vsa_min_cosine=-1.0, vsa_skip_sparse=False, vsa_exact_fraction=0.0)
    shallow, deep = by_phase(run(tmp_path / "a", 2, **full)), by_phase(run(tmp_path / "b", 4, **full))
    for phase in ("WARMUP", "FULL", "PREDICT", "CORRECT"):
        a, b = (statistics.median(x[0] for x in d[phase]) for d in (shallow, deep))
        assert 0 < a and b <= 1.05 * a, (phase, a, b)  # 28 -> 52 tensors: the same ops
        if phase != "CORRECT":
            assert all(syncs == 0 for _, syncs in deep[phase]), phase
    assert all(syncs <= 1 for _, syncs in deep["CORRECT"])


def test_no_host_sync_on_warmup_full_and_predict_steps_and_at_most_one_per_correct_step(tmp_path):
    phases = by_phase(run(tmp_path, 2))
    for phase in ("WARMUP", "FULL", "PREDICT"):
        assert all(syncs == 0 for _, syncs in phases[phase]), phase
    assert all(syncs <= 1 for _, syncs in phases["CORRECT"])


def test_the_flat_sample_is_the_tensors_windows_and_sums_per_tensor():
    params = [torch.randn(40, 50), torch.randn(7), torch.randn(3, 300)]
    w = Windows(params, per_tensor=100, seed=0, tag=1, scaled=False)
    x = w.gather(params)
    expect = torch.cat([p.reshape(-1)[s:s + n] for p, sl in zip(params, w.slices) for s, n in sl])
    assert torch.equal(x, expect) and x.numel() == w.numel == 100 + 7 + 100
    sums = w.segment_sum(x)
    assert torch.allclose(sums, torch.stack([t.double().sum() for t in x.split(w.lengths)]))
    assert torch.equal(w.gather([None, None, None]), torch.zeros(w.numel))


def test_a_flat_layout_aligned_to_blocks_round_trips_the_tensors_as_views():
    params = [torch.randn(40, 50), torch.randn(7), torch.randn(3, 300), torch.randn(5)]
    w = Windows(params, 0, seed=0, tag=4, scaled=False, fraction=1.0, select=[0, 1, 2], align=64)
    x = w.gather(params)
    assert w.padded == [2048, 64, 960, 0] and x.numel() == w.numel == 2048 + 64 + 960
    views = w.views(x)
    assert sorted(views) == [0, 1, 2] and all(torch.equal(views[i], params[i]) for i in views)
    assert all(v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for v in views.values())
    assert torch.equal(x[2000:2048], torch.zeros(48)) and torch.equal(x[2048 + 7:2112], torch.zeros(57))
    assert w.block_owner.tolist() == [0] * 32 + [1] + [2] * 15 and w.blocks_of([1, 2]) == list(range(32, 48))
    assert w.covered.tolist() == [True, True, True, False]


def test_a_range_of_the_flat_sample_is_gathered_alone_and_the_ranges_make_the_whole():
    """Chunks cut anywhere (through windows, pads and tensors with no gradient) gather what the whole
    gather holds there, scale included."""
    params = [torch.randn(40, 50), torch.randn(7), torch.randn(3, 300), torch.randn(5)]
    for w in (Windows(params, 0, seed=0, tag=4, scaled=False, fraction=1.0, select=[0, 1, 2], align=64),
              Windows(params, per_tensor=100, seed=0, tag=1, align=64)):
        for grads in (params, [params[0], None, params[2], params[3]]):
            whole = w.gather(grads)
            for size in (1, 63, 64, 500, w.numel):
                parts = [w.gather(grads, s, size) for s in range(0, w.numel, size)]
                assert all(p.numel() == min(size, w.numel - s) for p, s in zip(parts, range(0, w.numel, size)))
                assert torch.equal(torch.cat(parts), whole)


def test_deferred_values_are_read_one_post_late_and_survive_a_state_round_trip():
    d = Deferred()
    assert d.read() is None
    d.post(torch.tensor([1.0, 2.0]))
    assert d.read() is None
    d.post(torch.tensor([3.0, 4.0]))
    assert d.read() == [1.0, 2.0]
    again = Deferred()
    again.load_state_dict(d.state_dict(), "cpu")
    assert again.read() == [1.0, 2.0]
    d.post(torch.tensor([5.0, 6.0]))
    assert d.read() == [3.0, 4.0]


class _Largest(TorchDispatchMode):
    """The most elements of any tensor an op makes while `armed` (views excluded), since the last reset."""

    def __init__(self):
        super().__init__()
        self.armed, self.largest = False, (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.armed and not func.is_view:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                    self.largest = (t.numel(), func._schema.name)
        return out


def test_full_histories_hold_one_chunk_of_the_gradients_at_a_time(tmp_path):
    """Every tensor tracked in full, handed to the predictor in chunks of four compression blocks: when the
    tracker records or compares a step's gradients after its first record (FULL and CORRECT steps), no
    tensor it makes is larger than a chunk's records (window x chunk), far below the tracked elements
    (the whole gathered gradient)."""
    block, window = 64, 4
    chunk = 4 * block
    full = dict(vsa_probe_fraction=0.0, vsa_min_cosine=-1.0, vsa_skip_sparse=False, vsa_exact_fraction=0.0,
                vsa_compression_block=block, vsa_history_window=window)
    kw = dict(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4, learning_rate=1e-3,
              logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    t = VSATrainer(model=gpt2(2), args=VSATrainingArguments(**kw, **SCHEDULE, **full), train_dataset=data())
    mode, largest, observe = _Largest(), {}, tracking.Tracker.observe

    def watched(tracker, grads, step, correct, inv_scale=None):
        mode.armed, mode.largest = tracker.predictor.last_t >= 0, (0, None)
        try:
            return observe(tracker, grads, step, correct, inv_scale)
        finally:
            if mode.armed:
                largest[(step, "CORRECT" if correct else "FULL")] = mode.largest
            mode.armed = False

    with patch.object(tracking, "CHUNK", chunk), patch.object(tracking.Tracker, "observe", watched), mode:
        t.train()
    assert {phase for _, phase in largest} == {"FULL", "CORRECT"}
    assert t.vsa.tracker.windows.numel > 30 * window * chunk
    assert max(n for n, _ in largest.values()) <= window * chunk, largest
