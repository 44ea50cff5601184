"""The Trainer's observable contracts, side by side: each scenario runs the plain Trainer and VSATrainer
(with a schedule whose PREDICT steps skip the backward and write predictions) on the same model and data,
and compares what a user's code can see: callback events in order, checkpoint folders after rotation, the
best model reloaded, TrainerState's fields, log_history's entries, train()'s TrainOutput, resume."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import make_dataset, make_model
from hf_vsa import VSATrainer, VSATrainingArguments

# PREDICT steps with no backward (no exact tensors), the gate open: most steps predicted, few measured.
SKIPPING = dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                vsa_correct_every=3, vsa_exact_fraction=0.0, vsa_min_cosine=-1.0)
EVENTS = ("on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
          "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate",
          "on_predict", "on_save", "on_log", "on_prediction_step")


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []


for _name in EVENTS:  # every event, recorded by name
    setattr(Recorder, _name, lambda self, *a, _n=_name, **kw: self.events.append(_n))


def pair(out, vsa_only=None, callbacks=(), **kw):
    """(plain Trainer, VSATrainer) on the same model initialisation, data and arguments."""
    base = dict(max_steps=24, per_device_train_batch_size=8, learning_rate=1e-3, report_to="none", use_cpu=True,
                disable_tqdm=True, seed=0, logging_steps=3, save_strategy="no")
    base.update(kw)
    made = []
    for kind in ("plain", "vsa"):
        if kind == "plain":
            args = TrainingArguments(output_dir=str(out / kind), **base)
            cls = Trainer
        else:
            args = VSATrainingArguments(output_dir=str(out / kind), **base, **SKIPPING, **(vsa_only or {}))
            cls = VSATrainer
        made.append(cls(model=make_model(), args=args, train_dataset=make_dataset(256),
                        eval_dataset=make_dataset(32, 1), callbacks=[c() for c in callbacks]))
    return made


def recorder(t):
    return next(c for c in t.callback_handler.callbacks if isinstance(c, Recorder))


@pytest.mark.parametrize("kw", [dict(), dict(eval_strategy="steps", eval_steps=5, save_strategy="steps", save_steps=10),
                                dict(gradient_accumulation_steps=2, eval_strategy="epoch", max_steps=-1,
                                     num_train_epochs=2, save_strategy="epoch")],
                         ids=["plain", "eval_and_save_steps", "accumulation_epochs"])
def test_callback_events_fire_in_the_trainers_order(tmp_path, kw):
    plain, vsa = pair(tmp_path, callbacks=[Recorder], **kw)
    plain.train(), vsa.train()
    assert vsa.vsa.controller.counts["PREDICT"] > 0  # steps without a backward ran
    assert recorder(vsa).events == recorder(plain).events


def test_rotation_and_the_best_model_follow_the_trainers_rules(tmp_path):
    kw = dict(eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4, save_total_limit=2,
              load_best_model_at_end=True, metric_for_best_model="eval_loss")
    plain, vsa = pair(tmp_path, **kw)
    plain.train(), vsa.train()
    assert vsa.vsa.controller.counts["PREDICT"] > 0
    for t in (plain, vsa):
        evals = [(h["step"], h["eval_loss"]) for h in t.state.log_history if "eval_loss" in h]
        best_step = min(evals, key=lambda se: se[1])[0]
        assert t.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
        assert t.state.best_metric == min(e for _, e in evals)
        kept = sorted(os.listdir(t.args.output_dir))
        # the best checkpoint and the newest are kept (rotation keeps the best too)
        assert f"checkpoint-{best_step}" in kept and "checkpoint-24" in kept and len(kept) <= 3
        saved = load_file(os.path.join(t.state.best_model_checkpoint, "model.safetensors"))
        current = t.model.state_dict()
        assert all(torch.equal(saved[k], current[k]) for k in saved)  # the best model is the one loaded
    # the same files in each checkpoint, plus hf_vsa's state file
    p_ckpt = os.path.join(plain.args.output_dir, "checkpoint-24")
    v_ckpt = os.path.join(vsa.args.output_dir, "checkpoint-24")
    assert sorted(os.listdir(v_ckpt)) == sorted(os.listdir(p_ckpt) + ["vsa_state.safetensors"])


def test_trainer_state_log_history_and_train_output_have_the_trainers_shape(tmp_path):
    plain, vsa = pair(tmp_path, eval_strategy="steps", eval_steps=8)
    po, vo = plain.train(), vsa.train()
    assert vo.global_step == po.global_step == 24 and set(vo.metrics) == set(po.metrics)
    ps, vs = dataclasses.asdict(plain.state), dataclasses.asdict(vsa.state)
    p_logs, v_logs = ps.pop("log_history"), vs.pop("log_history")
    assert set(vs) == set(ps)
    for k in ("global_step", "max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps",
              "train_batch_size", "is_world_process_zero", "is_local_process_zero", "epoch"):
        assert vs[k] == ps[k], k
    # one entry per event, at the same steps, each holding at least the Trainer's keys (hf_vsa adds vsa/*)
    assert [h["step"] for h in v_logs] == [h["step"] for h in p_logs]
    for ph, vh in zip(p_logs, v_logs):
        assert set(ph) <= set(vh) and all(k.startswith("vsa/") for k in set(vh) - set(ph))
    assert vo.training_loss == pytest.approx(sum(h["loss"] for h in v_logs if "loss" in h) / 8)


def test_resume_continues_to_the_same_step_count_and_state_shape(tmp_path):
    kw = dict(save_strategy="steps", save_steps=8)
    plain, vsa = pair(tmp_path, **kw)
    plain.train(), vsa.train()
    again_p, again_v = pair(tmp_path / "again", **kw)
    rp = again_p.train(resume_from_checkpoint=os.path.join(plain.args.output_dir, "checkpoint-16"))
    rv = again_v.train(resume_from_checkpoint=os.path.join(vsa.args.output_dir, "checkpoint-16"))
    assert rv.global_step == rp.global_step == 24
    state = lambda t: json.load(open(os.path.join(t.args.output_dir, "checkpoint-24", "trainer_state.json")))  # noqa
    sp, sv = state(again_p), state(again_v)
    assert [h["step"] for h in sv["log_history"]] == [h["step"] for h in sp["log_history"]]
    # the resumed VSATrainer run is the uninterrupted one (same weights)
    for k, x in vsa.model.state_dict().items():
        assert torch.equal(x, again_v.model.state_dict()[k]), k


def test_model_init_builds_a_fresh_model_for_each_train_call(tmp_path):
    args = VSATrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                                save_strategy="no", **SKIPPING)
    t = VSATrainer(model_init=lambda: make_model(), args=args, train_dataset=make_dataset(256))
    first = t.train().training_loss
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}
    second = t.train().training_loss  # model_init again: the same run from the same seed
    assert first == second
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in weights.items())


def test_hyperparameter_search_runs_its_trials_with_hf_vsa_on(tmp_path):
    """Trainer.hyperparameter_search (optuna): each trial a fresh model from model_init, a fresh hf_vsa
    engine, and the objective from its own evaluation."""
    pytest.importorskip("optuna")
    args = VSATrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                                save_strategy="no", eval_strategy="steps", eval_steps=6, **SKIPPING)
    t = VSATrainer(model_init=lambda: make_model(), args=args, train_dataset=make_dataset(256),
                   eval_dataset=make_dataset(32, 1))
    engines = []

    class Seen(TrainerCallback):
        def on_train_end(self, *a, **kw):
            engines.append((t.vsa, t.vsa.controller.counts["PREDICT"]))
    t.add_callback(Seen)
    best = t.hyperparameter_search(direction="minimize", backend="optuna", n_trials=2,
                                   hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2,
                                                                                                log=True)})
    assert len(engines) == 2 and engines[0][0] is not engines[1][0]  # a fresh engine per trial
    assert all(predicted > 0 for _, predicted in engines)
    assert best.objective == best.objective and "learning_rate" in best.hyperparameters


class Line(torch.nn.Module):
    """y = a x + b with two 0-dim parameters and no config: the smallest model the Trainer accepts."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.0)), torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x, labels=None):
        y = self.a * x + self.b
        return {"loss": torch.nn.functional.mse_loss(y, labels), "logits": y}


class Points(torch.utils.data.Dataset):
    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, generator=g)
        self.y = 2 * self.x + 3 + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def line_trainer(out, callbacks=(), **kw):
    args = VSATrainingArguments(output_dir=str(out), per_device_train_batch_size=8, learning_rate=0.1,
                                report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **SKIPPING, **kw)
    return VSATrainer(model=Line(), args=args, train_dataset=Points(), eval_dataset=Points(16, 1),
                      callbacks=list(callbacks))


def test_a_model_of_scalar_parameters_trains_evaluates_and_saves(tmp_path):
    t = line_trainer(tmp_path, max_steps=24, eval_strategy="steps", eval_steps=8, save_strategy="steps", save_steps=8)
    out = t.train()
    assert out.global_step == 24 and t.vsa.controller.counts["PREDICT"] > 0
    assert abs(t.model.a.item() - 2) < abs(0 - 2)  # it learnt something
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-16", "checkpoint-24", "checkpoint-8"]


def test_a_callback_stops_training_and_stateful_callbacks_come_back_on_resume(tmp_path):
    from transformers import EarlyStoppingCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 5:
                control.should_training_stop = True
    assert line_trainer(tmp_path / "stop", [Stop()], max_steps=24).train().global_step == 5
    kw = dict(max_steps=8, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
              load_best_model_at_end=True, metric_for_best_model="eval_loss")
    line_trainer(tmp_path / "a", [EarlyStoppingCallback(early_stopping_patience=5, early_stopping_threshold=0.2)],
                 **kw).train()
    again = line_trainer(tmp_path / "a", [EarlyStoppingCallback()], restore_callback_states_from_checkpoint=True,
                         **dict(kw, max_steps=12))
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    cb = next(c for c in again.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback))
    assert (cb.early_stopping_patience, cb.early_stopping_threshold) == (5, 0.2)
