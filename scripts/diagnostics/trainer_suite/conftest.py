"""Runs the Trainer's own tests with VSATrainer substituted (HF_VSA_SUBSTITUTE=1): transformers.Trainer and
transformers.TrainingArguments become hf_vsa's, with a short schedule whose PREDICT steps run no forward and
no backward (every tensor predicted, the gate open), so predicted steps happen in most runs. Counts the runs
and those with PREDICT steps.

Use: copy this file to the root of a transformers source tree (next to its tests/), then from there

    python -m pytest -q tests/trainer/test_trainer_callback.py ...                       # the plain Trainer
    HF_VSA_SUBSTITUTE=1 python -m pytest -q tests/trainer/test_trainer_callback.py ...   # VSATrainer

and compare: no test that passes with the plain Trainer may fail with VSATrainer (the drop-in issue).
The transformers tests are not shipped in its wheel or sdist; results/upstream_trainer_tests.json records
a run on the files named there, made with compare.py (its docstring has the commands)."""
import dataclasses
import json
import os

import transformers

RUNS = []

if os.environ.get("HF_VSA_SUBSTITUTE") == "1":
    from hf_vsa import VSATrainer, VSATrainingArguments

    SHORT = dict(vsa_warmup_steps=2, vsa_history_window=2, vsa_ar_order=1, vsa_full_steps=1, vsa_predict_steps=4,
                 vsa_correct_every=2, vsa_exact_fraction=0.0, vsa_min_cosine=-1.0, vsa_probe_fraction=0.0)
    ns = {"__annotations__": {k: type(v) for k, v in SHORT.items()}, "__module__": __name__}
    ns.update(SHORT)
    ShortArgs = dataclasses.dataclass(type("TrainingArguments", (VSATrainingArguments,), ns))
    TrainingArguments = ShortArgs  # (so that pickle finds it: the Trainer saves its arguments with torch.save)

    class Trainer(VSATrainer):
        def train(self, *a, **kw):
            try:
                return super().train(*a, **kw)
            finally:
                e = getattr(self, "vsa", None)
                if e is not None:
                    RUNS.append(dict(e.controller.counts))

    Trainer.__name__ = Trainer.__qualname__ = "Trainer"
    import sys
    for module in {id(transformers): transformers, id(sys.modules["transformers"]): sys.modules["transformers"]}.values():
        module.Trainer = Trainer  # (importing hf_vsa can leave a new transformers module object in sys.modules)
        module.TrainingArguments = ShortArgs


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("HF_VSA_SUBSTITUTE") == "1":
        with_predict = sum(1 for r in RUNS if r.get("PREDICT", 0) > 0)
        line = dict(train_runs=len(RUNS), runs_with_predict_steps=with_predict,
                    predict_steps=sum(r.get("PREDICT", 0) for r in RUNS), steps=sum(sum(r.values()) for r in RUNS))
        terminalreporter.write_line("hf_vsa substituted: " + json.dumps(line))
        if os.environ.get("HF_VSA_RUNS_OUT"):  # for compare.py
            with open(os.environ["HF_VSA_RUNS_OUT"], "w") as f:
                json.dump(line, f)
