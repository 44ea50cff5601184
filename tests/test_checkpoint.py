"""VSA state in checkpoints: exact resume, refusal of bad state, atomic writes."""
import contextlib
import json
import os
from unittest.mock import patch

import pytest
import torch
from safetensors import safe_open

import hf_vsa.checkpoint as ckpt
import hf_vsa.tracking as tracking
from conftest import make_dataset, make_model
from hf_vsa import VSATrainer, VSATrainingArguments

# (DropBP at its configured rate: the tiny model's blocks carry alike signal, so the measured rate
# would back PREDICT steps off to backprop; tests of that pass vsa_adaptive_block_drop=True)
SCHEDULE = dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                vsa_correct_every=3, vsa_adaptive_phases=True, vsa_block_drop=0.5, vsa_adaptive_block_drop=False)
# Phases for 24 steps: WWW FF PPCPPP FF PPCPPP FF PPC (adaptive lengths may vary after the first cycle)
STEPS = 24


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-3,
                logging_steps=1, report_to="none", use_cpu=True, save_strategy="steps", save_steps=1,
                disable_tqdm=True, seed=0, **SCHEDULE)
    base.update(kw)
    return VSATrainingArguments(**base)


def train(out, resume=None, data=512, **kw):
    chunk = kw.pop("_chunk", None)  # the flat history handed to the predictor in chunks of this many elements
    model = make_model()
    with patch.object(tracking, "CHUNK", chunk) if chunk else contextlib.nullcontext():
        t = VSATrainer(model=model, args=args(out, **kw), train_dataset=make_dataset(data))
        t.train(resume_from_checkpoint=resume)
    return model, t


def losses(t, start=0):
    return [(h["step"], h["loss"]) for h in t.state.log_history if "loss" in h and h["step"] > start]


VARIANTS = {"accum1": dict(gradient_accumulation_steps=1),
            "full_history": dict(vsa_probe_fraction=0.0),  # every tensor's history from the start
            "full_history_chunked": dict(vsa_probe_fraction=0.0, _chunk=4096),  # ...in chunks of 4096 elements
            "accum2": dict(gradient_accumulation_steps=2),
            "partial_gated": dict(gradient_accumulation_steps=1, vsa_exact_fraction=0.3, vsa_min_cosine=0.0),
            "uncompressed": dict(vsa_compression="none"),
            # the measured noise scale decides whole-step PREDICT and the micro-batches each step computes
            "accum4_measured": dict(gradient_accumulation_steps=4, vsa_adaptive_block_drop=True),
            "retiring": dict(vsa_min_cosine=0.1, vsa_retire_after=1),  # tensors retire at every CORRECT step
            # the measured drop rates, which back this model's PREDICT steps off to backprop
            "measured_drop": dict(vsa_adaptive_block_drop=True),
            "vsa_stochastic_accum": dict(gradient_accumulation_steps=2, vsa_compression="vsa", vsa_bundle_size=2,
                                         vsa_ternary_rounding="stochastic", vsa_ternary_accumulation=True)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def straight(request, tmp_path_factory):
    kw = VARIANTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    model, t = train(out, **dict(kw))
    if "_chunk" in kw:
        assert len(t.vsa.tracker.predictor.params) > 1  # several chunks, saved and restored
    return kw, out, model, t


@pytest.mark.parametrize("at", [2, 7, 8], ids=["in_warmup", "mid_predict", "after_correct"])
def test_resume_equals_the_uninterrupted_run(tmp_path, straight, at):
    kw, out, model, t = straight
    # (step 7: in a PREDICT block; FULL where the measurement backed it off to backprop)
    assert t.vsa.phases[at - 1] in {2: ["WARMUP"], 7: ["PREDICT", "FULL"], 8: ["CORRECT"]}[at]
    if not kw.get("vsa_adaptive_block_drop", False):
        assert t.vsa.phases[at - 1] != "FULL"
    resumed_model, r = train(tmp_path, resume=str(out / f"checkpoint-{at}"), **dict(kw))
    assert r.vsa.tracker.predict_mask == t.vsa.tracker.predict_mask
    assert r.vsa.tracker.tracked == t.vsa.tracker.tracked
    assert r.vsa.phases == t.vsa.phases[at:]
    assert r.vsa.whole_steps == [s for s in t.vsa.whole_steps if s >= at]
    assert (r.vsa.micro.seen, r.vsa.micro.computed, r.vsa.micro.target) == (
        t.vsa.micro.seen, t.vsa.micro.computed, t.vsa.micro.target)
    assert r.vsa.controller.counts == t.vsa.controller.counts  # statistics cover the whole run
    assert losses(r, at) == losses(t, at)
    for (n, x), (_, y) in zip(model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(x, y), n
    so, ro = t.optimizer.state_dict()["state"], r.optimizer.state_dict()["state"]
    for k in so:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(so[k][name], ro[k][name])


# The whole data set in every batch and a small step: the prediction beats the zero gradient, so the
# probe ends (at step 20, the first FULL step after the second CORRECT step's measurement).
PREDICTABLE = dict(data=32, per_device_train_batch_size=32, learning_rate=1e-5)


@pytest.mark.parametrize("at", [19, 21], ids=["probe_ends_on_resume", "after_the_probe"])
def test_resume_across_the_end_of_the_probe_equals_the_uninterrupted_run(tmp_path, at):
    """Resumed before the probe ends, and after it, the run is the same."""
    out = tmp_path / "straight"
    model, t = train(out, max_steps=24, **PREDICTABLE)
    resumed_model, r = train(tmp_path / "resumed", resume=str(out / f"checkpoint-{at}"), max_steps=24, **PREDICTABLE)
    assert (not r.vsa.tracker.probing) and (not t.vsa.tracker.probing) and r.vsa.tracker.tracked == t.vsa.tracker.tracked
    assert r.vsa.phases == t.vsa.phases[at:] and losses(r, at) == losses(t, at)
    for (n, x), (_, y) in zip(model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(x, y), n
    probed = json.loads(safe_open(str(out / "checkpoint-19" / ckpt.STATE_FILE), "pt").metadata()["hf_vsa"])
    full = json.loads(safe_open(str(out / "checkpoint-20" / ckpt.STATE_FILE), "pt").metadata()["hf_vsa"])
    assert probed["tracker/probing"] and not full["tracker/probing"]


def test_resume_true_takes_the_last_checkpoint(tmp_path):
    train(tmp_path, max_steps=12)
    model, t = train(tmp_path, resume=True, max_steps=STEPS)
    assert t.vsa.controller.step == STEPS and len(t.vsa.phases) == STEPS - 12


def test_saved_file_is_tensors_plus_plain_metadata(straight):
    _, out, _, t = straight
    path = out / "checkpoint-8" / ckpt.STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt"
        info = json.loads(meta["hf_vsa"])
        assert info["controller"]["step"] == 8 and info["settings"]["vsa_predictor"] == t.args.vsa_predictor
        names = list(f.keys())
        assert all(isinstance(f.get_tensor(k), torch.Tensor) for k in names)
    kind = "g0" if t.vsa.tracker.history is None else "codes"  # running sums, or a ring of records
    assert f"tracker/predictor.{kind}.0" in names and info["tracker/names"] == t.vsa.names
    assert not list(out.glob("checkpoint-*/*.tmp"))


@pytest.fixture
def checkpoint(tmp_path):
    train(tmp_path, max_steps=8)
    return tmp_path / "checkpoint-8"


def resume_error(tmp_path, checkpoint, **kw):
    model = make_model()
    t = VSATrainer(model=model, args=args(tmp_path / "again", **kw), train_dataset=make_dataset(512))
    return t, lambda: t.train(resume_from_checkpoint=str(checkpoint))


def test_missing_state_is_refused_naming_the_file(tmp_path, checkpoint):
    os.remove(checkpoint / ckpt.STATE_FILE)
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(FileNotFoundError, match="vsa_state.safetensors.*vsa_reset_state_on_resume"):
        go()


def test_reset_opt_in_restarts_the_state_with_a_warning(tmp_path, checkpoint, caplog):
    os.remove(checkpoint / ckpt.STATE_FILE)
    t, go = resume_error(tmp_path, checkpoint, vsa_reset_state_on_resume=True)
    go()
    assert "starting it from scratch" in caplog.text
    assert t.vsa.controller.step == STEPS - 8


def test_truncated_file_is_refused(tmp_path, checkpoint):
    path = checkpoint / ckpt.STATE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="cannot read VSA state"):
        go()


def test_changed_setting_is_refused(tmp_path, checkpoint):
    _, go = resume_error(tmp_path, checkpoint, vsa_history_decay=0.8)
    with pytest.raises(ValueError, match="vsa_history_decay"):
        go()


def test_state_saved_while_probing_needs_the_probe_on_resume(tmp_path, checkpoint):
    _, go = resume_error(tmp_path, checkpoint, vsa_min_cosine=-1.0)  # an open gate has no probe
    with pytest.raises(ValueError, match="vsa_state.safetensors: .*saved while the predictor measured a sample"):
        go()
    _, go = resume_error(tmp_path / "b", checkpoint, vsa_probe_fraction=0.5)
    with pytest.raises(ValueError, match="vsa_probe_fraction"):
        go()


@pytest.mark.parametrize("damage", ["slot_missing", "not_a_vector"])
def test_bad_posted_values_are_refused_naming_the_file(tmp_path, checkpoint, damage):
    """The values the next decisions read (posted a backprop step earlier) are part of the state."""
    def edit(tensors):
        if damage == "slot_missing":
            del tensors["mirror/slot0"]
        else:
            tensors["mirror/slot0"] = tensors["mirror/slot0"][None]
    _rewrite(checkpoint / ckpt.STATE_FILE, edit)
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="vsa_state.safetensors: mirror/ must hold slot0 and slot1"):
        go()


def _rewrite(path, edit):
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def _rewrite_info(path, edit):
    """Edit the hf_vsa JSON metadata of a state file in place."""
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["hf_vsa"])
    edit(info)
    save_file(tensors, str(path), metadata={**meta, "hf_vsa": json.dumps(info)})


def test_state_from_another_format_version_is_refused(tmp_path, checkpoint):
    _rewrite_info(checkpoint / ckpt.STATE_FILE, lambda info: info.pop("version"))  # as before versions existed
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="vsa_state.safetensors: VSA state format version None"):
        go()


def test_untracked_tensors_take_no_bytes_and_a_bad_tracked_list_is_refused(tmp_path):
    _, t = train(tmp_path, max_steps=8, vsa_probe_fraction=0.0)  # full histories from the start
    checkpoint = tmp_path / "checkpoint-8"
    path = checkpoint / ckpt.STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors, info = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["hf_vsa"])
    # vsa_skip_sparse dropped the token-type embedding (the data uses one type): the flat history holds
    # whole blocks of the tracked tensors only
    names = t.vsa.names
    assert names.index("bert.embeddings.token_type_embeddings.weight") not in info["tracker/tracked"]
    assert names.index("bert.embeddings.word_embeddings.weight") in info["tracker/tracked"]
    block, window = t.args.vsa_compression_block, t.args.vsa_history_window
    blocks = sum(-(-t.vsa.params[i].numel() // block) for i in info["tracker/tracked"])
    assert tensors["tracker/predictor.codes.0"].shape == (window, blocks * block // 2)  # int4: 2 per byte (one chunk)
    _rewrite_info(path, lambda info: info["tracker/tracked"].append(10 ** 6))
    _, go = resume_error(tmp_path, checkpoint, vsa_probe_fraction=0.0)
    with pytest.raises(ValueError, match="vsa_state.safetensors: bad tracker state .*tracked must list distinct"):
        go()


def _negative_count(info):
    info["tracker/closed"][0] = -1


@pytest.mark.parametrize("edit", [lambda info: info["tracker/closed"].pop(), _negative_count], ids=["short", "negative"])
def test_bad_retirement_counts_are_refused(tmp_path, checkpoint, edit):
    _rewrite_info(checkpoint / ckpt.STATE_FILE, edit)
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="vsa_state.safetensors: bad tracker state .*closed must list one count per"):
        go()


def test_wrong_shape_is_refused(tmp_path, checkpoint):
    key = "tracker/predictor.codes.0"
    _rewrite(checkpoint / ckpt.STATE_FILE, lambda t: t.__setitem__(key, torch.zeros(3, 32, dtype=torch.uint8)))
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(ValueError, match=r"vsa_state.safetensors: .*the saved codes.0 is \(3, 32\)"):
        go()


def test_state_of_other_parameters_is_refused(tmp_path, checkpoint):
    def rename(info):
        info["tracker/names"][0] = "head.weight"
    _rewrite_info(checkpoint / ckpt.STATE_FILE, rename)
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="other trainable parameters .*#0: saved 'head.weight', now 'bert.embeddings"):
        go()


def test_crash_mid_save_leaves_the_previous_state_loadable(tmp_path, checkpoint, monkeypatch):
    t, _ = resume_error(tmp_path, checkpoint)
    t.train(resume_from_checkpoint=str(checkpoint))  # a valid engine with state after 24 steps
    before = (checkpoint / ckpt.STATE_FILE).read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_engine(t.vsa, str(checkpoint))
    assert (checkpoint / ckpt.STATE_FILE).read_bytes() == before
    monkeypatch.undo()
    _, go = resume_error(tmp_path / "third", checkpoint)
    go()  # still loads


def test_save_only_model_writes_no_state(tmp_path):
    train(tmp_path, max_steps=6, save_only_model=True)
    assert not (tmp_path / "checkpoint-6" / ckpt.STATE_FILE).exists()


def test_bad_block_consistency_state_is_refused(tmp_path, checkpoint):
    path = checkpoint / ckpt.STATE_FILE
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("consistency/mean").numel() > 0  # the default run has droppable blocks
    _rewrite(path, lambda t: t.__setitem__("consistency/mean", torch.zeros(7, dtype=torch.float64)))
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(ValueError, match=r"vsa_state.safetensors: bad block consistency state.*mean is \(7,\)"):
        go()


def test_bad_block_drop_probabilities_are_refused(tmp_path, checkpoint):
    _rewrite_info(checkpoint / ckpt.STATE_FILE, lambda info: info["engine/drop"].__setitem__(0, 1.5))
    _, go = resume_error(tmp_path, checkpoint)
    with pytest.raises(ValueError, match=r"vsa_state.safetensors: engine/drop must list one probability in \[0, 1\]"):
        go()


def test_resuming_with_dropbp_turned_on_starts_measuring_the_blocks(tmp_path):
    # Saved with vsa_block_drop=1 (no droppable block, nothing measured): resuming with DropBP on
    # is a setting change hf_vsa can follow, with nothing lost: the blocks are measured from then on.
    train(tmp_path, max_steps=8, vsa_block_drop=1.0)
    _, t = train(tmp_path / "again", resume=str(tmp_path / "checkpoint-8"), max_steps=16, save_strategy="no")
    assert t.vsa.blocks and t.vsa.consistency.measured > 0
