"""Adaptive accumulation on a real run: the computed micro-batches' gradient is their mean, also where
the Trainer scales each micro-batch's loss by label tokens that differ from one micro-batch to the next."""
import copy

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from hf_vsa import VSATrainer, VSATrainingArguments


def masked_data(n=256, seq=16):
    """The same sequence every time (a strong mean gradient: the noise scale is small, so steps compute
    few micro-batches), with a leading share of the labels masked that differs by example: the micro-
    batches of a step hold from 1 to 15 label tokens each (as SFT with padding or completion-only loss)."""
    ids = [(7 * k) % 256 for k in range(seq)]
    rows = []
    for i in range(n):
        cut = (i * 5) % (seq - 1)
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return Dataset.from_list(rows)


def test_fewer_micro_batches_give_the_token_mean_of_the_computed_ones(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    seen, checks = [], []

    class Check(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.before = copy.deepcopy(model.state_dict())
            seen.clear()

        def on_pre_optimizer_step(self, *a, **kw):
            e = t.vsa
            if e.micro.run == e.accum or e.phase.name not in ("WARMUP", "FULL"):
                return
            # The reference: the Trainer's loss over the computed micro-batches alone (summed token losses over
            # their items as the Trainer counts them), on the weights before the step.
            ref = GPT2LMHeadModel(cfg)
            ref.load_state_dict(self.before)
            total, tokens = 0.0, 0
            for inputs in seen:
                out = ref(input_ids=inputs["input_ids"])
                logits, labels = out.logits[:, :-1], inputs["labels"][:, 1:]
                total = total + torch.nn.functional.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1),
                                                                  ignore_index=-100, reduction="sum")
                tokens += int(t._get_num_items_in_batch([inputs], "cpu"))  # the Trainer's own count
            (total / tokens).backward()
            w = model.transformer.h[0].mlp.c_fc.weight
            r = ref.transformer.h[0].mlp.c_fc.weight.grad
            checks.append(torch.allclose(w.grad, r, rtol=1e-4, atol=1e-7))

    args = VSATrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2,
                                gradient_accumulation_steps=4, learning_rate=1e-3, max_grad_norm=0.0,
                                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                                vsa_tolerance=0.2)
    t = VSATrainer(model=model, args=args, train_dataset=masked_data(), callbacks=[Check()])
    original = t.compute_loss

    def recording(model_, inputs, *a, **kw):
        if torch.is_grad_enabled():
            seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return original(model_, inputs, *a, **kw)

    t.compute_loss = recording
    t.train()
    assert checks and all(checks), checks  # steps that computed fewer micro-batches, each checked
