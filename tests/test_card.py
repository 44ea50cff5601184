"""The model card VSATrainer writes: the Trainer's card plus the hf_vsa section, parseable."""
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import make_dataset, make_model
from hf_vsa import VSATrainer, VSATrainingArguments


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("card")
    args = VSATrainingArguments(output_dir=str(out), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                                report_to="none", use_cpu=True, eval_strategy="steps", eval_steps=10,
                                save_strategy="steps", save_steps=10, disable_tqdm=True, logging_steps=5,
                                vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                                vsa_correct_every=3)
    t = VSATrainer(model=make_model(), args=args, train_dataset=make_dataset(256), eval_dataset=make_dataset(32, 1))
    t.train()
    assert not (out / "README.md").exists()  # as the Trainer: a card only when asked for
    t.create_model_card()
    return out, t


def test_card_is_written_and_parses_back_with_tags(trained):
    out, t = trained
    card = ModelCard.load(out / "README.md")
    assert {"hf_vsa", "vsa-trainer"} <= set(card.data.tags)
    assert "## Trained with hf_vsa" in card.text and "@software{hf_vsa" in card.text
    assert not (out / "checkpoint-20" / "README.md").exists()  # checkpoints hold what the Trainer writes


def test_card_statistics_equal_the_trainer_counters(trained):
    out, t = trained
    text = ModelCard.load(out / "README.md").text
    c = t.vsa.controller.counts
    for name, n in c.items():
        assert f"| {name} | {n} |" in text
    whole = len(t.vsa.whole_steps)
    assert (f"| Full backward passes | {20 - c['PREDICT']} of 20 optimizer steps ({c['PREDICT']} PREDICT steps, "
            f"{whole} of them whole-step) |") in text
    assert "vsa_exact_fraction: 0.2" in text
    peak, end = t.vsa.tracker.peak_state_ratio, t.vsa.tracker.state_memory_ratio()
    assert 0 < peak and end <= peak  # retirement only frees buffers
    assert (f"| VSA state memory | {peak:.2f}x the trainable parameters' fp32 bytes at its peak, {end:.2f}x at the "
            "end |") in text
    # the measured numbers come first; the configuration is folded away below them
    assert text.index("| Speedup per step, estimated |") < text.index("<details>") < text.index("```yaml")
    assert "| Gradient noise scale |" in text


def test_the_trainers_own_card_content_survives(trained):
    out, t = trained
    text = ModelCard.load(out / "README.md").text
    assert "Training hyperparameters" in text and "Framework versions" in text
    assert "Validation Loss" in text  # the Trainer's results table


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    args = VSATrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=1, vsa_predict_steps=2,
                                vsa_correct_every=2)
    t = VSATrainer(model=make_model(), args=args, train_dataset=make_dataset(64))
    monkeypatch.setattr(type(t.args), "should_save", property(lambda self: False))
    monkeypatch.setattr(t, "is_world_process_zero", lambda: False)
    t.train()
    t.create_model_card()
    assert not (tmp_path / "README.md").exists()


def test_plot_is_copied_and_embedded(trained, tmp_path):
    out, t = trained
    png = tmp_path / "loss_vs_time.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    t.create_model_card(plot=str(png))
    assert (out / "loss_vs_time.png").read_bytes() == png.read_bytes()
    assert "![eval loss vs wall time](loss_vs_time.png)" in ModelCard.load(out / "README.md").text


def test_push_to_hub_uploads_the_card_unchanged(trained, monkeypatch):
    """push_to_hub through huggingface_hub's real client and HTTP, against a local hub endpoint."""
    import huggingface_hub
    import transformers.trainer as trainer_module
    from hub_server import start
    out, t = trained
    hub = start()
    endpoint = f"http://127.0.0.1:{hub.server_port}"
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(trainer_module, "hf_api", lambda: huggingface_hub.HfApi(endpoint=endpoint))
    try:
        t.push_to_hub(commit_message="end of training")
    finally:
        hub.shutdown()
    repo = f"user/{out.name}"
    assert f"/api/models/{repo}/commit/main" in hub.requests
    uploaded = hub.files[(repo, "README.md")].decode()
    assert uploaded == (out / "README.md").read_text()
    card = ModelCard(uploaded)
    assert {"hf_vsa", "vsa-trainer"} <= set(card.data.tags) and "## Trained with hf_vsa" in card.text
    assert (repo, "model.safetensors") in hub.files
