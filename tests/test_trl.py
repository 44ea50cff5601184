"""VSA mixed into the real trl.SFTTrainer, on a tiny GPT-2 and real text (CPython's textwrap.py)."""
import pytest
import torch
from datasets import Dataset

trl = pytest.importorskip("trl")
from conftest import BackwardCounter  # noqa: E402
from tasks import byte_tokenizer, stdlib_lines, tiny_causal_lm  # noqa: E402

from hf_vsa import Phase, VSASFTConfig, VSASFTTrainer  # noqa: E402

# (DropBP at its configured rate: the tiny model's blocks carry alike signal, so the measured rate
# would back PREDICT steps off to backprop; tests of that pass vsa_adaptive_block_drop=True)
SCHEDULE = dict(vsa_warmup_steps=3, vsa_history_window=3, vsa_full_steps=2, vsa_predict_steps=6,
                vsa_correct_every=3, vsa_block_drop=0.5, vsa_adaptive_block_drop=False)


def text_data():
    return Dataset.from_dict({"text": stdlib_lines(256)})


def prompt_completion_data():
    lines = stdlib_lines(256)
    return Dataset.from_dict({"prompt": [x[:len(x) // 2] for x in lines], "completion": [x[len(x) // 2:] for x in lines]})


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=24, per_device_train_batch_size=8, learning_rate=1e-3,
                logging_steps=4, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                max_length=48, bf16=False, **SCHEDULE)
    base.update(kw)
    return VSASFTConfig(**base)


def sft(tmp_path, data=None, cls=VSASFTTrainer, callbacks=(), model=None, **kw):
    model = model or tiny_causal_lm()
    t = cls(model=model, args=config(tmp_path, **kw), train_dataset=data or text_data(),
            processing_class=byte_tokenizer(), callbacks=list(callbacks))
    return model, t


def test_the_swap_trains_with_predict_steps_that_skip_the_lowest_blocks_backward(tmp_path):
    model = tiny_causal_lm()
    low = BackwardCounter(model.transformer.h[0].attn.c_attn.weight)
    _, t = sft(tmp_path, model=model, callbacks=[low])
    t.train()
    phases = t.vsa.phases
    assert "PREDICT" in phases and model.transformer.h[0] in t.vsa.blocks  # (the top block holds exact tensors)
    predict = [low.per_step[k] for k, p in enumerate(phases) if p == "PREDICT"]
    assert 0 in predict  # DropBP or whole-step PREDICT: the lowest block ran no backward
    assert all(n == 1 for n, p in zip(low.per_step, phases) if p != "PREDICT")
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in t.state.log_history if "loss" in h)


def test_switched_off_it_is_sfttrainer_bit_for_bit(tmp_path):
    a, ta = sft(tmp_path / "a", cls=trl.SFTTrainer, vsa_enabled=False)
    ta.train()
    b, tb = sft(tmp_path / "b", vsa_enabled=False)
    tb.train()
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_packing_and_completion_only_loss(tmp_path, packing, kind):
    data = text_data() if kind == "text" else prompt_completion_data()
    _, t = sft(tmp_path, data=data, packing=packing)
    batch = next(iter(t.get_train_dataloader()))
    if kind == "prompt_completion":  # completion-only loss: prompt tokens, attended to, are left out of the loss
        attended = batch.get("attention_mask", torch.ones_like(batch["labels"])) == 1
        assert ((batch["labels"] == -100) & attended).any()
    t.train()
    assert t.vsa.controller.counts["PREDICT"] > 0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in t.state.log_history if "loss" in h)


def test_lora_through_peft_config_tracks_only_the_adapters(tmp_path):
    from peft import LoraConfig
    model = tiny_causal_lm()
    t = VSASFTTrainer(model=model, args=config(tmp_path), train_dataset=text_data(), processing_class=byte_tokenizer(),
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    t.train()
    assert t.vsa.names and all("lora_" in n for n in t.vsa.names)
    assert t.vsa.controller.counts["PREDICT"] > 0


def test_resume_from_a_checkpoint_is_bit_exact(tmp_path):
    kw = dict(save_strategy="steps", save_steps=7, gradient_accumulation_steps=2)
    a, ta = sft(tmp_path / "straight", **kw)
    ta.train()
    b, tb = sft(tmp_path / "resumed", **kw)
    tb.train(resume_from_checkpoint=str(tmp_path / "straight" / "out" / "checkpoint-14"))
    assert tb.vsa.phases == ta.vsa.phases[14:] and Phase.PREDICT.name in ta.vsa.phases[:14]
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    card = (tmp_path / "straight" / "out" / "README.md").read_text()
    assert "## Trained with hf_vsa" in card


def test_sft_script_runs_an_ordinary_trl_job_and_prints_the_summary(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "sft.py"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--compare", "--output_dir", str(tmp_path),
                           "--max_steps", "16", "--eval_steps", "8", "--vsa_warmup_steps", "3",
                           "--vsa_history_window", "3", "--vsa_full_steps", "2", "--vsa_predict_steps", "6",
                           "--vsa_correct_every", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "== SFTTrainer summary ==" in out and "== VSASFTTrainer summary ==" in out
    assert "VSASFTTrainer against SFTTrainer" in out and "optimizer steps        16" in out
