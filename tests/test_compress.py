"""Compressed gradient history and ternary accumulation: error bounds, sizes, determinism,
allocations, state round trip, and a real Trainer run."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from conftest import make_dataset, make_model
from hf_vsa import GradientPredictor, VSATrainer, VSATrainingArguments
from hf_vsa.accumulation import TernaryAccumulator
from hf_vsa.compress import (CompressedHistory, blocks_of, dequantize, int4_pack, pack,
                             packed_bytes, ternarize, unpack)

BLOCK = 64


def real_grads(seed=0):
    """Gradients of a tiny real BERT classifier on one real-shaped batch."""
    torch.manual_seed(seed)
    model = make_model()
    batch = make_dataset(8, seed=seed)[:8]
    out = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                labels=torch.tensor(batch["labels"]))
    out.loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("source", ["random", "real"])
def test_deterministic_ternary_error_is_the_optimal_scale_error(source):
    # With the support fixed, scale = mean |x| over it minimises the error, which is then exactly
    # ||x||^2 - n_kept * scale^2 per block, and never more than ||x||^2.
    xs = [torch.randn(1000) * 3, torch.randn(7, 33)] if source == "random" else real_grads()
    for x in xs:
        codes, scales = ternarize(x, BLOCK)
        back = dequantize(pack(codes), scales, x.numel(), BLOCK)
        err = (x.reshape(-1) - back) ** 2
        flat = torch.cat([x.reshape(-1), x.new_zeros(blocks_of(x.numel(), BLOCK) * BLOCK - x.numel())])
        per_block = flat.view(-1, BLOCK).pow(2).sum(1) - (codes != 0).sum(1) * scales ** 2
        torch.testing.assert_close(err.sum(), per_block.sum(), rtol=1e-4, atol=1e-6)
        assert err.sum() <= x.pow(2).sum() + 1e-6
        if source == "random":  # Gaussian: about 0.9 cosine
            assert torch.nn.functional.cosine_similarity(back, x.reshape(-1), 0) > 0.85


@pytest.mark.parametrize("source", ["random", "real"])
def test_int4_residual_codes_are_within_half_a_level(source):
    # 4 bits for the residual: round to nearest of -7..7 times max|x|/7 per block, half a level of error.
    xs = [torch.randn(1000) * 3, torch.randn(7, 33)] if source == "random" else real_grads()
    for x in xs:
        before = x.clone()
        packed, scales = int4_pack(x, BLOCK)
        assert torch.equal(x, before)  # the caller's tensor is left alone
        assert packed.numel() == packed_bytes(x.numel(), BLOCK, 4) and scales.numel() == blocks_of(x.numel(), BLOCK)
        back = dequantize(packed, scales, x.numel(), BLOCK, 4)
        flat = torch.cat([x.reshape(-1), x.new_zeros(blocks_of(x.numel(), BLOCK) * BLOCK - x.numel())])
        torch.testing.assert_close(scales, flat.view(-1, BLOCK).abs().amax(1).clamp_min(1e-30) / 7)
        half_level = (scales / 2).repeat_interleave(BLOCK)[:x.numel()]
        assert ((x.reshape(-1) - back).abs() <= half_level * (1 + 1e-5)).all()
        if source == "random":
            assert torch.nn.functional.cosine_similarity(back, x.reshape(-1), 0) > 0.99


def test_stochastic_ternary_is_unbiased_with_the_documented_variance():
    x = torch.randn(4 * BLOCK)
    samples = []
    for s in range(400):
        g = torch.Generator().manual_seed(s)
        codes, scales = ternarize(x, BLOCK, g)
        samples.append(dequantize(pack(codes), scales, x.numel(), BLOCK))
    samples = torch.stack(samples)
    scale = x.view(-1, BLOCK).abs().amax(1).repeat_interleave(BLOCK)
    var = x.abs() * (scale - x.abs())  # per element
    torch.testing.assert_close(samples.var(0).sum(), var.sum(), rtol=0.1, atol=0)
    assert ((samples.mean(0) - x).abs() <= 4 * (var / 400).sqrt() + 1e-6).all()


@pytest.mark.parametrize("bits,values", [(2, [-1, 0, 1]), (4, list(range(-7, 8)))])
def test_pack_round_trips_and_has_the_formula_size(bits, values):
    v = torch.tensor(values * 8, dtype=torch.int8)[: (len(values) * 8) // (8 // bits) * (8 // bits)]
    packed = pack(v, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == v.numel() * bits // 8
    assert torch.equal(unpack(packed, bits), v.float())


@pytest.mark.parametrize("kind", ["ternary", "int4", "vsa"])
def test_history_bytes_equal_the_formula(kind):
    params = [torch.zeros(1000), torch.zeros(3, 5)]
    h = CompressedHistory(params, kind, window=8, block=BLOCK, bundle=4)
    assert h.nbytes() == 0  # nothing is allocated before the first record
    h.allocate([0, 1])
    slots, bits = {"ternary": (8, 2), "int4": (8, 4), "vsa": (2, 4)}[kind]
    expect = sum(slots * packed_bytes(p.numel(), BLOCK, bits)  # codes
                 + 8 * blocks_of(p.numel(), BLOCK) * 4  # record scales
                 + blocks_of(p.numel(), BLOCK) * (BLOCK + 4)  # int8 error feedback + its scales
                 for p in params)
    assert h.nbytes() == expect
    assert packed_bytes(1000, BLOCK, 2) == math.ceil(1000 / BLOCK) * BLOCK // 4


@pytest.mark.parametrize("kind,codes_per_element", [("ternary", 8 / 4), ("int4", 8 / 2), ("vsa", 8 / (2 * 4))])
def test_predictor_state_bytes_equal_the_documented_formula(kind, codes_per_element):
    # README: per predicted element, window/4 (ternary; int4: window/2; vsa: window/(2*bundle)) + 1 (error feedback)
    # + 4*(window + 2)/block (scales) + 1/2 (the 4-bit residual); window 8, bundle 4.
    params = [torch.zeros(4 * BLOCK), torch.zeros(2, BLOCK)]
    pred = GradientPredictor(params, compression=kind, window=8, block=BLOCK, bundle=4)
    pred.record([torch.randn_like(p) for p in params], 0)
    state = sum(v.numel() * v.element_size() for k, v in pred.state_dict().items()
                if isinstance(v, torch.Tensor) and k != "skipped")  # (and an int64 count of non-finite records)
    n = sum(p.numel() for p in params)
    assert state == n * (codes_per_element + 1 + 4 * (8 + 2) / BLOCK + 1 / 2)


def test_vsa_unbinding_returns_each_record_plus_the_crosstalk_of_its_bundle():
    n = 1 << 16
    p = torch.zeros(n)
    h = CompressedHistory([p], "vsa", window=4, block=BLOCK, bundle=4, seed=3)
    t = CompressedHistory([p], "ternary", window=4, block=BLOCK, seed=3)
    torch.manual_seed(0)
    for step in range(4):
        g = torch.randn(n)
        h.push([g], step)
        t.push([g], step)
    one = h.weighted_sum({0: 1.0})[0]
    exact = t.weighted_sum({0: 1.0})[0]  # the same ternary record, not bundled
    crosstalk = one - exact  # = scale_0 * key_0 * sum_j key_j * codes_j over the bundle's other records
    assert abs(torch.nn.functional.cosine_similarity(crosstalk, exact, 0)) < 0.05
    s0 = t.scales[0][0].repeat_interleave(BLOCK)
    nonzero = sum(unpack(t.codes[0][k]).abs() for k in (1, 2, 3))
    torch.testing.assert_close(crosstalk.pow(2).sum(), (s0 ** 2 * nonzero).sum(), rtol=0.05, atol=0)


def test_error_feedback_makes_the_window_mean_track_the_true_mean():
    # Constant gradient: rounding alone repeats the same error in every record; error feedback
    # cancels it in the sum, so the window mean is far closer to the truth.
    g = torch.randn(4096)
    h = CompressedHistory([torch.zeros(4096)], "ternary", window=8, block=BLOCK)
    for step in range(8):
        h.push([g], step)
    mean = h.weighted_sum({k: 1 / 8 for k in range(8)})[0]
    codes, scales = ternarize(g, BLOCK)
    once = dequantize(pack(codes), scales, g.numel(), BLOCK)
    assert (mean - g).norm() < 0.4 * (once - g).norm()


@pytest.mark.parametrize("rounding", ["deterministic", "stochastic"])
def test_history_is_deterministic_for_a_seed(rounding):
    grads = real_grads()

    def run(seed):
        h = CompressedHistory([torch.zeros_like(g) for g in grads], "vsa", window=4, block=BLOCK,
                              rounding=rounding, seed=seed)
        for step in range(5):
            h.push([g * (step + 1) for g in grads], step)
        return h.tensors()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # keys (and stochastic rounding) follow the seed


class LargestAllocation(TorchDispatchMode):
    """Bytes of the largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("kind", ["ternary", "int4", "vsa"])
def test_no_dense_projection_is_ever_allocated(kind):
    n = 10_000_000
    g = torch.randn(n)
    h = CompressedHistory([torch.zeros(n)], kind, window=4, block=256, bundle=2)
    with LargestAllocation() as mode:
        for step in range(3):
            h.push([g], step)
        h.weighted_sum({0: 0.5, 1: 0.25, 2: 0.25})
    # A projection to even 2 dimensions would be 2x the gradient; everything stays at 1x (fp32,
    # padded to whole blocks).
    assert mode.largest <= blocks_of(n, 256) * 256 * 4


@pytest.mark.parametrize("kind", ["ternary", "int4", "vsa"])
def test_predictor_state_round_trips_through_safetensors(tmp_path, kind):
    grads = real_grads()
    params = [torch.zeros_like(g) for g in grads]
    a = GradientPredictor(params, compression=kind, window=4, block=BLOCK, seed=5)
    for step in range(6):
        a.record([g * (1 + 0.1 * step) for g in grads], step)
    a.correct([g * 1.7 for g in grads], 7)
    state = a.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp_path / "s.safetensors"))
    loaded = {**{k: v for k, v in state.items() if not isinstance(v, torch.Tensor)},
              **load_file(str(tmp_path / "s.safetensors"))}
    b = GradientPredictor(params, compression=kind, window=4, block=BLOCK, seed=5)
    b.load_state_dict(loaded)
    for x, y in zip(a.predict(9), b.predict(9)):
        assert torch.equal(x, y)
    loaded[next(k for k in tensors if k.startswith("codes."))] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="codes.0: expected"):
        b.load_state_dict(loaded)


def test_compressed_prediction_follows_the_uncompressed_fit_on_real_gradients():
    # Same records, same fit: the compressed ring's prediction points where the fp32 one does.
    grads = [real_grads(s) for s in range(8)]
    params = [torch.zeros_like(g) for g in grads[0]]
    preds = {}
    for kind in ("none", "ternary", "vsa"):
        p = GradientPredictor(params, compression=kind, window=8, block=BLOCK, decay=1.0, residual_decay=0.0)
        for step, g in enumerate(grads):
            p.record(g, step)
        preds[kind] = torch.cat([x.reshape(-1) for x in p.predict(8)])
    cos = {k: torch.nn.functional.cosine_similarity(preds[k], preds["none"], 0).item() for k in ("ternary", "vsa")}
    assert cos["ternary"] > 0.9, cos
    assert cos["vsa"] > 0.3, cos


def test_int4_records_are_within_half_a_level_and_error_feedback_restores_the_newest():
    g = torch.randn(5000)
    h = CompressedHistory([torch.zeros(5000)], "int4", window=4, block=BLOCK)
    h.push([g], 0)
    first = h.weighted_sum({1: 1.0})  # (slot 1 is empty: weight on nothing reads zero)
    assert not first[0].any()
    codes = unpack(h.codes[0][0], 4)
    assert codes.abs().max() <= 7 and codes.abs().max() == 7  # the block's largest element is a full level
    one = dequantize(h.codes[0][0], h.scales[0][0], g.numel(), BLOCK, 4)
    level = h.scales[0][0].repeat_interleave(BLOCK)[:g.numel()]
    assert ((one - g).abs() <= level / 2 + 1e-6).all()
    # the newest record is read back with its rounding error (int8) added: far closer still
    assert (h.weighted_sum({0: 1.0})[0] - g).norm() < 0.05 * (one - g).norm()


@pytest.mark.parametrize("kind", ["none", "ternary", "int4", "vsa"])
def test_gram_reads_each_record_as_the_weighted_sum_does(kind):
    # The AR fit's inner products come from the records decoded together (records()); they must be
    # those of the records as a prediction reads them, one at a time, the newest with its rounding error.
    torch.manual_seed(0)
    params = [torch.zeros(n) for n in (300, 7, 2 * BLOCK)]
    h = CompressedHistory(params, kind, window=4, block=BLOCK)
    for t in range(6):  # the ring has wrapped: the newest record is in slot 1 (vsa: a new bundle of 2)
        h.push([torch.randn_like(p) for p in params], t)
    slots = [k for k, _ in sorted(h.filled(), key=lambda kt: kt[1])]
    assert slots == ([0, 1] if kind == "vsa" else [2, 3, 0, 1])
    gram = h.gram(range(3), slots)
    for i in range(3):
        r = torch.stack([h.weighted_sum({k: 1.0}, [i], padded=True)[0] for k in slots])
        assert torch.equal(gram[i], (r @ r.T).double())


def test_ar_forecast_from_int4_records_keeps_the_fp32_forecast_where_ternary_loses_it():
    # An oscillation plus a trend, with noise: AR(2) weights of both signs add up the records'
    # rounding noise; 4-bit records keep the forecast, 2-bit ones lose much of it.
    torch.manual_seed(0)
    base, trend = torch.randn(20000), torch.randn(20000)
    seq = [(-1) ** t * base + 0.1 * t * trend + 0.3 * torch.randn(20000) for t in range(8)]
    preds = {}
    for kind in ("none", "int4", "ternary"):
        p = GradientPredictor([torch.zeros(20000)], kind="ar", compression=kind, window=8, block=BLOCK,
                              residual_decay=0.0)
        for t, g in enumerate(seq):
            p.record([g], t)
        preds[kind] = p.predict(8)[0]
    cos = {k: torch.nn.functional.cosine_similarity(preds[k], preds["none"], 0).item() for k in ("int4", "ternary")}
    assert cos["int4"] > 0.97 and cos["ternary"] < cos["int4"] - 0.1, cos


def test_ternary_accumulation_is_unbiased_within_the_documented_error():
    micro = [real_grads(s) for s in range(4)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in micro[0]]
    exact = [sum(m[i] for m in micro) for i in range(len(params))]
    bound = 0.0  # documented E||error||^2: sum |g| (s - |g|) over the rounded micro-batches
    for m in micro[:-1]:
        for g in m:
            flat = torch.cat([g.reshape(-1), g.new_zeros(blocks_of(g.numel(), BLOCK) * BLOCK - g.numel())])
            s = flat.view(-1, BLOCK).abs().amax(1, keepdim=True)
            bound += (flat.view(-1, BLOCK).abs() * (s - flat.view(-1, BLOCK).abs())).sum().item()
    errors = []
    for seed in range(20):
        acc = TernaryAccumulator(params, block=BLOCK, seed=seed)
        for k, m in enumerate(micro):
            with acc.micro_batch(step=0, micro=k, last=k == len(micro) - 1):
                loss = sum((p * g).sum() for p, g in zip(params, m))  # d loss / d p = g
                loss.backward()
            if k < len(micro) - 1:
                assert all(p.grad is None for p in params)  # nothing full-precision kept in between
        errors.append(sum((p.grad - e).pow(2).sum().item() for p, e in zip(params, exact)))
        for p in params:
            p.grad = None
    assert sum(errors) / len(errors) == pytest.approx(bound, rel=0.25)


class GradAtStep(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.grads.append([p.grad.clone() for p in self.model.parameters() if p.grad is not None])


def test_trainer_with_ternary_accumulation_is_deterministic_and_close_to_exact(tmp_path):
    def run(ternary):
        model = make_model()
        cb = GradAtStep(model)
        args = VSATrainingArguments(output_dir=str(tmp_path / str(ternary)), max_steps=4, per_device_train_batch_size=4,
                                    gradient_accumulation_steps=4, learning_rate=1e-3, report_to="none",
                                    use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                                    vsa_ternary_accumulation=ternary)
        t = VSATrainer(model=model, args=args, train_dataset=make_dataset(64), callbacks=[cb])
        t.train()
        return model, cb.grads

    exact_model, exact = run(False)
    m1, g1 = run(True)
    m2, g2 = run(True)
    for (n, x), (_, y) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(x, y), n
    a = torch.cat([g.reshape(-1) for g in g1[0]])
    b = torch.cat([g.reshape(-1) for g in exact[0]])  # step 0: same weights, same data
    assert a.shape == b.shape
    assert torch.nn.functional.cosine_similarity(a, b, 0) > 0.5
    assert not torch.equal(a, b)


def test_ternary_accumulation_is_in_the_gradient_ddp_averages(tmp_path):
    # DDP reads each gradient in a hook that runs after ours: the restored earlier micro-batches
    # must already be in .grad then, or DDP would average (and write back) the last one alone.
    # One process is enough to tell: DDP still copies its bucket back into .grad.
    import socket
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        batches = [make_dataset(8, seed=s)[:8] for s in (0, 1)]

        def run(wrap):
            torch.manual_seed(0)
            model = make_model()
            net = DDP(model) if wrap else model
            params = [p for p in model.parameters() if p.requires_grad]
            acc = TernaryAccumulator(params, block=BLOCK, seed=4)
            for k, b in enumerate(batches):
                last = k == 1
                ctx = net.no_sync() if wrap and not last else torch.enable_grad()
                with ctx, acc.micro_batch(step=0, micro=k, last=last):
                    net(**{n: torch.tensor(b[n]) for n in ("input_ids", "attention_mask", "labels")}).loss.backward()
            return [p.grad.clone() for p in params]

        plain, ddp = run(False), run(True)
        for a, b in zip(plain, ddp):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()
