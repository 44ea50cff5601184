"""GPU checks: VSA state on CUDA and no host sync on the PREDICT path. Skipped without a GPU."""
import pytest
import torch

from conftest import make_dataset, make_model
from hf_vsa import VSATrainer, VSATrainingArguments
from hf_vsa.engine import VSAEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("exact", [0.0, 0.3])
def test_state_on_cuda_and_the_prediction_path_never_syncs(tmp_path, monkeypatch, exact):
    calls = []
    original = VSAEngine.write_prediction

    def guarded(self, grad_scale=None):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
        try:
            original(self, grad_scale)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        calls.append(self.step)

    monkeypatch.setattr(VSAEngine, "write_prediction", guarded)
    args = VSATrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=8,
                                report_to="none", save_strategy="no", disable_tqdm=True,
                                vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=8,
                                vsa_correct_every=4, vsa_exact_fraction=exact, vsa_min_cosine=-1.0)
    t = VSATrainer(model=make_model(), args=args, train_dataset=make_dataset(512))
    t.train()
    assert t.vsa.tracker.history.codes and all(b.is_cuda for b in t.vsa.tracker.history.codes)
    assert len(calls) == t.vsa.phases.count("PREDICT") > 0


@pytest.mark.parametrize("kind", ["ternary", "vsa"])
def test_compressed_history_on_cuda_is_seeded_and_syncs_nowhere(kind):
    from hf_vsa.compress import CompressedHistory
    torch.manual_seed(0)
    grads = [torch.randn(1000, 300), torch.randn(77)]

    def run(device):
        h = CompressedHistory([g.to(device) for g in grads], kind, window=4, block=256, seed=3)
        torch.cuda.set_sync_debug_mode("error" if device == "cuda" else 0)
        try:
            for t in range(6):
                h.push([g.to(device) * (t + 1) for g in grads], t)
            out = h.weighted_sum({0: 0.5, 1: 0.5})
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(x.device.type == device for x in (*h.tensors().values(), *out))
        return h.tensors(), out

    a, out_a = run("cuda")
    b, _ = run("cuda")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same device: the same codes
    if kind == "ternary":  # deterministic rounding draws nothing: CPU and CUDA agree
        c, out_c = run("cpu")
        for x, y in zip(out_a, out_c):  # elements at a threshold may round apart: nearly equal
            assert torch.nn.functional.cosine_similarity(x.cpu().reshape(-1), y.reshape(-1), 0) > 0.999


def test_the_probe_samples_on_the_gradients_device_without_a_host_sync():
    from conftest import Probe
    torch.manual_seed(0)
    grads = [torch.randn(256, 512, device="cuda"), torch.randn(77, device="cuda")]
    probe = Probe([torch.zeros_like(g) for g in grads], 1 / 16, seed=0, align=256)
    torch.cuda.set_sync_debug_mode("error")  # every record samples: no host sync
    try:
        out = probe.sample(grads)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out[0].is_cuda and out[0].numel() == probe.windows.numel == 8192 + 256


@pytest.mark.parametrize("exact", [0.0, 0.3])
def test_fp16_on_cuda_predicts_under_the_real_grad_scaler(tmp_path, monkeypatch, exact):
    # fp16=True on a GPU: the Accelerator's own GradScaler; the prediction is written on its scale
    # (read on the device, no sync) and the run stays finite.
    scales = []
    original = VSAEngine.write_prediction

    def spy(self, grad_scale=None):
        scales.append(grad_scale)
        original(self, grad_scale)

    monkeypatch.setattr(VSAEngine, "write_prediction", spy)
    args = VSATrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=8, fp16=True,
                                report_to="none", save_strategy="no", disable_tqdm=True, learning_rate=1e-3,
                                vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=8,
                                vsa_correct_every=4, vsa_exact_fraction=exact, vsa_min_cosine=-1.0)
    model = make_model()
    t = VSATrainer(model=model, args=args, train_dataset=make_dataset(512))
    t.train()
    assert t.accelerator.scaler is not None
    assert len(scales) == t.vsa.phases.count("PREDICT") > 0
    assert all(s is not None and s.is_cuda for s in scales)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_warmup_full_and_predict_steps_never_sync_the_host_on_cuda(tmp_path, monkeypatch):
    """Every call hf_vsa makes on a training step runs under sync debug mode "error" (any host sync
    raises), but for the CORRECT steps' one measured read."""
    from hf_vsa.accumulation import AdaptiveAccumulation
    from hf_vsa.controller import Phase

    def strict(fn, allow=lambda self: False):
        def run(self, *a, **kw):
            if allow(self):
                return fn(self, *a, **kw)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(self, *a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return run

    correct = lambda self: self.phase is Phase.CORRECT  # noqa: E731
    for name in ("first_micro_batch", "write_prediction"):
        monkeypatch.setattr(VSAEngine, name, strict(getattr(VSAEngine, name)))
    monkeypatch.setattr(VSAEngine, "after_backward", strict(VSAEngine.after_backward, correct))
    monkeypatch.setattr(VSAEngine, "begin_step", strict(VSAEngine.begin_step))
    monkeypatch.setattr(AdaptiveAccumulation, "rescale", strict(AdaptiveAccumulation.rescale))
    args = VSATrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8,
                                gradient_accumulation_steps=2, report_to="none", save_strategy="no",
                                disable_tqdm=True, logging_steps=1000, vsa_warmup_steps=3, vsa_full_steps=2,
                                vsa_predict_steps=8, vsa_correct_every=4, vsa_block_drop=0.5, vsa_adaptive_block_drop=False)
    t = VSATrainer(model=make_model().cuda(), args=args, train_dataset=make_dataset(1024))
    t.train()
    assert {"WARMUP", "FULL", "PREDICT", "CORRECT"} <= set(t.vsa.phases)
