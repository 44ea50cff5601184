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
    assert all(b.is_cuda for b in t.vsa.predictor.g0)
    assert len(calls) == t.vsa.phases.count("PREDICT") > 0
