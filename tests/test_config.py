import pytest
from transformers import HfArgumentParser

from hf_vsa import VSATrainingArguments


def make(**kw):
    return VSATrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **kw)


def test_defaults_match_the_documented_names_and_values():
    a = make()
    assert (a.vsa_enabled, a.vsa_warmup_steps, a.vsa_full_steps, a.vsa_predict_steps, a.vsa_correct_every) == \
        (True, 10, 5, 20, 5)
    assert (a.vsa_history_decay, a.vsa_history_window, a.vsa_loss_threshold) == (0.95, 8, 0.1)
    assert a.vsa_seed == a.seed


def test_parsed_from_the_command_line():
    (a,) = HfArgumentParser(VSATrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--report_to", "none", "--vsa_predict_steps", "12", "--vsa_predictor", "momentum",
         "--vsa_adaptive_phases", "false", "--vsa_history_decay", "0.9"])
    assert (a.vsa_predict_steps, a.vsa_predictor, a.vsa_adaptive_phases, a.vsa_history_decay) == \
        (12, "momentum", False, 0.9)


def test_every_field_has_help():
    from dataclasses import fields
    vsa = [f for f in fields(VSATrainingArguments) if f.name.startswith("vsa_")]
    assert len(vsa) >= 15 and all(f.metadata.get("help") for f in vsa)


@pytest.mark.parametrize("field,value", [
    ("vsa_warmup_steps", -1), ("vsa_full_steps", -2), ("vsa_predict_steps", -1), ("vsa_correct_every", 0),
    ("vsa_history_decay", 0.0), ("vsa_history_decay", 1.5), ("vsa_history_window", 1),
    ("vsa_residual_decay", -0.1), ("vsa_residual_decay", 1.1), ("vsa_residual_threshold", 0.5),
    ("vsa_loss_threshold", 0.0), ("vsa_predictor", "kalman"), ("vsa_momentum", 1.0),
    ("vsa_exact_fraction", 1.0), ("vsa_block_drop", -0.1), ("vsa_block_drop", 1.5), ("vsa_min_cosine", 2.0), ("vsa_probe_fraction", -0.1), ("vsa_probe_fraction", 1.5), ("vsa_retire_after", -1), ("vsa_preset", "turbo"),
    ("vsa_compression", "zip"), ("vsa_compression_block", 6), ("vsa_compression_block", 0),
    ("vsa_ternary_rounding", "up"), ("vsa_bundle_size", 1), ("vsa_bundle_size", 8), ("vsa_trust", "full"),
])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


def test_both_phase_lengths_zero_refused():
    with pytest.raises(ValueError, match="vsa_full_steps and vsa_predict_steps"):
        make(vsa_full_steps=0, vsa_predict_steps=0)


@pytest.mark.parametrize("optim", ["lomo", "adalomo", "galore_adamw_layerwise"])
def test_optimizers_that_update_inside_backward_are_refused(optim):
    with pytest.raises(ValueError, match="optim"):
        make(optim=optim)


def test_fsdp_is_refused_with_what_is_supported():
    with pytest.raises(ValueError, match="fsdp.*supported: single process and DDP"):
        make(fsdp="full_shard")


def test_disabled_skips_validation():
    assert make(vsa_enabled=False, vsa_correct_every=0).vsa_correct_every == 0


def test_preset_fills_defaults_but_explicit_values_win():
    a = make(vsa_preset="sketch")
    assert a.vsa_adaptive_phases is False and a.vsa_predictor == "wls"
    b = make(vsa_preset="sketch", vsa_predict_steps=7)
    assert b.vsa_predict_steps == 7 and b.vsa_adaptive_phases is False
