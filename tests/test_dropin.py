"""The Trainer's contracts hold with hf_vsa switched on: files in output_dir, the callback list, logs,
train_loss, models without a config, arguments by default."""
import math
import os

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from conftest import make_dataset, make_model
from hf_vsa import VSATrainer, VSATrainingArguments

SCHEDULE = dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                vsa_correct_every=3)


def common(out, **kw):
    return dict(dict(output_dir=str(out), max_steps=16, per_device_train_batch_size=8, learning_rate=1e-3,
                     report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                     logging_steps=2), **kw)


class MLP(nn.Module):
    """A model the Trainer accepts that has no `config` and no repeated blocks (a plain layer stack)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Embedding(64, 16), nn.Flatten(), nn.Linear(16 * 12, 32), nn.ReLU(),
                                 nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, input_ids, labels=None, attention_mask=None):
        logits = self.net(input_ids)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_a_model_without_a_config_trains_and_its_predict_steps_back_off_without_blocks(tmp_path):
    """No config: nothing reads one (no card unless asked). No block DropBP can skip and no prediction
    admitted: a partial step would freeze every tensor below the output end for nothing, so PREDICT
    steps run backprop (backed off) and every tensor moves on every step."""
    model = MLP()
    t = VSATrainer(model=model, args=VSATrainingArguments(**common(tmp_path, save_strategy="steps", save_steps=8,
                                                                      **SCHEDULE)),
                   train_dataset=make_dataset(256))
    out = t.train()
    assert math.isfinite(out.training_loss)
    assert t.vsa.controller.counts["PREDICT"] == 0 and t.vsa.controller.step == 16
    assert not t.vsa.dropbp.blocks and not (tmp_path / "README.md").exists()
    assert (tmp_path / "checkpoint-16" / "vsa_state.safetensors").exists()


def test_checkpoints_hold_what_the_trainer_writes_plus_the_state_file(tmp_path):
    kw = dict(save_strategy="steps", save_steps=8, save_total_limit=1)
    Trainer(model=make_model(), args=TrainingArguments(**common(tmp_path / "plain", **kw)),
            train_dataset=make_dataset(256)).train()
    VSATrainer(model=make_model(), args=VSATrainingArguments(**common(tmp_path / "vsa", **kw, **SCHEDULE)),
               train_dataset=make_dataset(256)).train()
    plain, vsa = (sorted(os.listdir(tmp_path / d)) for d in ("plain", "vsa"))
    assert plain == vsa == ["checkpoint-16"]  # rotation as the Trainer's; no README.md
    files = lambda d: set(os.listdir(tmp_path / d / "checkpoint-16"))  # noqa: E731
    assert files("vsa") == files("plain") | {"vsa_state.safetensors"}


def test_the_state_file_is_in_the_checkpoint_before_the_trainer_pushes_or_rotates_it(tmp_path, monkeypatch):
    import transformers.trainer as trainer_module
    seen = []
    real = trainer_module.rotate_checkpoints

    def rotate(output_dir, **kw):
        seen.append(sorted(p for p in os.listdir(output_dir)))
        seen.append([os.path.exists(os.path.join(output_dir, c, "vsa_state.safetensors"))
                     for c in os.listdir(output_dir) if c.startswith("checkpoint-")])
        return real(output_dir=output_dir, **kw)

    monkeypatch.setattr(trainer_module, "rotate_checkpoints", rotate)
    VSATrainer(model=make_model(), args=VSATrainingArguments(**common(tmp_path, save_strategy="steps", save_steps=8,
                                                                      **SCHEDULE)),
               train_dataset=make_dataset(256)).train()
    assert seen and all(all(flags) for flags in seen[1::2])


def test_the_callback_list_is_the_one_the_user_built(tmp_path):
    plain = Trainer(model=make_model(), args=TrainingArguments(**common(tmp_path / "a")), train_dataset=make_dataset(64))
    vsa = VSATrainer(model=make_model(), args=VSATrainingArguments(**common(tmp_path / "b")),
                     train_dataset=make_dataset(64))
    assert [type(c) for c in vsa.callback_handler.callbacks] == [type(c) for c in plain.callback_handler.callbacks]
    vsa.train()  # the engine is driven all the same
    assert vsa.vsa is not None and vsa.vsa.controller.step == 16 and sum(vsa.vsa.seconds.values()) > 0


def test_train_loss_is_the_mean_of_the_logged_losses_when_forwards_are_skipped(tmp_path):
    # One label for all: a strong mean gradient, so adaptive accumulation leaves micro-batches out.
    data = make_dataset(2048).map(lambda row: {"labels": 1})
    t = VSATrainer(model=make_model(), args=VSATrainingArguments(**common(tmp_path, gradient_accumulation_steps=4,
                                                                          vsa_tolerance=0.2, **SCHEDULE)),
                   train_dataset=data)
    out = t.train()
    logged = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert any("vsa/measured_loss" in h for h in t.state.log_history)  # forwards were skipped
    assert len(logged) == 8 and math.isclose(out.training_loss, sum(logged) / len(logged), rel_tol=1e-3)


def test_logs_are_the_same_in_two_identical_runs_and_hold_no_nan(tmp_path):
    def logs(out):
        t = VSATrainer(model=make_model(), args=VSATrainingArguments(**common(out, logging_steps=1, **SCHEDULE)),
                       train_dataset=make_dataset(256))
        t.train()
        return [{k: v for k, v in h.items() if not k.startswith("train_")} for h in t.state.log_history]

    a, b = logs(tmp_path / "a"), logs(tmp_path / "b")
    assert a == b
    assert all(not (isinstance(v, float) and v != v) for h in a for v in h.values())
    assert not any("vsa/speedup_estimate" in h for h in a)  # wall time: not a per-step log


def test_vsatrainer_without_arguments_builds_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = VSATrainer(make_model())
    assert isinstance(t.args, VSATrainingArguments) and t.args.output_dir == "trainer_output"
    assert t.args.vsa_enabled


def test_checkpoints_cross_between_the_plain_trainer_and_vsatrainer(tmp_path):
    """The plain Trainer resumes from VSATrainer's checkpoint (the state file is one more file). VSATrainer
    resuming from the plain Trainer's refuses, naming the argument that starts hf_vsa's state afresh, and
    resumes with it."""
    import pytest
    kw = dict(save_strategy="steps", save_steps=8)
    VSATrainer(model=make_model(), args=VSATrainingArguments(**common(tmp_path / "vsa", **kw, **SCHEDULE)),
               train_dataset=make_dataset(256)).train()
    plain = Trainer(model=make_model(), args=TrainingArguments(**common(tmp_path / "p", max_steps=20, **kw)),
                    train_dataset=make_dataset(256))
    assert plain.train(resume_from_checkpoint=str(tmp_path / "vsa" / "checkpoint-8")).global_step == 20
    again = lambda **extra: VSATrainer(  # noqa: E731
        model=make_model(), args=VSATrainingArguments(**common(tmp_path / "v2", max_steps=20, **kw, **extra)),
        train_dataset=make_dataset(256))
    with pytest.raises(FileNotFoundError, match="vsa_reset_state_on_resume=True"):
        again().train(resume_from_checkpoint=str(tmp_path / "p" / "checkpoint-16"))
    t = again(vsa_reset_state_on_resume=True)
    assert t.train(resume_from_checkpoint=str(tmp_path / "p" / "checkpoint-16")).global_step == 20
    assert t.vsa.controller.step == 4  # hf_vsa's own schedule starts at the resumed step


def test_evaluate_and_predict_are_the_trainers_before_and_after_training(tmp_path):
    evl = make_dataset(32, 1)
    t = VSATrainer(model=make_model(), args=VSATrainingArguments(**common(tmp_path, **SCHEDULE)),
                   train_dataset=make_dataset(256), eval_dataset=evl)
    plain = Trainer(model=make_model(), args=TrainingArguments(**common(tmp_path / "p")), eval_dataset=evl)
    assert t.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"]  # no engine before training
    t.train()
    out = t.predict(evl)
    assert out.predictions.shape == (32, 2) and math.isfinite(out.metrics["test_loss"])


def test_early_stopping_stops_a_vsatrainer_run(tmp_path):
    from transformers import EarlyStoppingCallback
    a = VSATrainingArguments(**common(tmp_path, max_steps=200, eval_strategy="steps", eval_steps=4,
                                      save_strategy="steps", save_steps=4, load_best_model_at_end=True,
                                      metric_for_best_model="eval_loss", learning_rate=0.0, **SCHEDULE))
    t = VSATrainer(model=make_model(), args=a, train_dataset=make_dataset(2048), eval_dataset=make_dataset(16, 1),
                   callbacks=[EarlyStoppingCallback(early_stopping_patience=2)])
    out = t.train()  # a zero learning rate: the eval loss never improves, so the run stops after 3 evaluations
    assert out.global_step == 12


def test_with_the_defaults_at_one_micro_batch_a_step_it_trains_as_the_trainer_bit_for_bit(tmp_path):
    """The default skips nothing where nothing is measured to pay: no partial backward (vsa_block_drop=0),
    whole-step PREDICT only from a measured noise scale (two or more micro-batches a step), so the PREDICT
    blocks run backprop while their CORRECT steps measure the prediction, and the trajectory is the
    Trainer's, every weight and every logged loss."""
    kw = dict(max_steps=40, logging_steps=5)
    plain = Trainer(model=make_model(), args=TrainingArguments(**common(tmp_path / "plain", **kw)),
                    train_dataset=make_dataset(512))
    plain.train()
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    # (with the drop rate not measured, vsa_adaptive_block_drop=False, the configured rate alone decides)
    for extra in ({}, {"vsa_adaptive_block_drop": False}):
        vsa = VSATrainer(model=make_model(), args=VSATrainingArguments(**common(tmp_path / "vsa", **kw, **extra)),
                         train_dataset=make_dataset(512))
        vsa.train()
        e = vsa.vsa
        assert e.controller.counts["CORRECT"] > 0 and e.tracker.corrections > 0  # the prediction was measured
        assert "PREDICT" not in e.phases and e.stats()["vsa/backward_fraction"] == 1.0
        for (name, a), b in zip(plain.model.named_parameters(), vsa.model.parameters()):
            assert torch.equal(a, b), name
        assert losses(plain) == losses(vsa)
