"""Trainer checkpoints are adapter folders; resuming and load_best_model_at_end read them back.

The reference for a resumed run is the uninterrupted run of the same Trainer (same seed, same
data order, float32 on the CPU); the resumed run starts from other adapter values, so only the
checkpoint can bring it to the same end.
"""

from __future__ import annotations

import modapt
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama

hf_callback = pytest.importorskip("modapt.hf_callback")

RECIPE = {"adapter": [{"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj"]}]}


def data():
    inputs = tiny_inputs(batch=12, padded=False, seed=5)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in inputs["input_ids"]]


def trainer(model, out, **extra):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=5e-3,
                             report_to=[], save_strategy="steps", save_steps=3, logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, seed=11, **extra)
    return hf_callback.ModaptTrainer(model=model, args=args, train_dataset=data(), eval_dataset=data()[:4])


def adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in modapt.trainable_parameters(model).items()}


def test_checkpoints_hold_the_adapter_and_resume_ends_where_the_run_ends(tmp_path):
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    model = modapt.apply(tiny_llama(), RECIPE)
    trainer(model, tmp_path / "run").train()
    final = adapter(model)
    for step in (3, 6):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        tensors = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        assert tensors < 0.25 * base_bytes, (tensors, base_bytes)
        assert not (folder / "model.safetensors").exists()
        assert (folder / "optimizer.pt").is_file() and (folder / "trainer_state.json").is_file()
        modapt.load(tiny_llama(), folder)  # a modapt adapter folder
    loaded = modapt.load(tiny_llama(), tmp_path / "run" / "checkpoint-6")
    for name, value in adapter(loaded).items():
        assert torch.equal(value, final[name])

    # another run, from other adapter values: resuming from step 3 must end at the same adapter
    other = modapt.apply(tiny_llama(), RECIPE)
    with torch.no_grad():
        for p in modapt.trainable_parameters(other).values():
            p.add_(torch.randn_like(p))
    trainer(other, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    resumed = adapter(other)
    assert resumed.keys() == final.keys()
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], atol=1e-6, rtol=0)


def test_load_best_model_at_end_reads_the_best_checkpoint(tmp_path):
    model = modapt.apply(tiny_llama(), RECIPE)
    t = trainer(model, tmp_path / "run", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                metric_for_best_model="loss", greater_is_better=False)
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None
    expected = adapter(modapt.load(tiny_llama(), best))
    for name, value in adapter(model).items():
        assert torch.equal(value, expected[name])


def test_trl_sft_trainer_adds_the_regulariser(tmp_path):
    trl = pytest.importorskip("trl")
    modapt_adalora = pytest.importorskip("modapt_adalora")
    from datasets import Dataset

    recipe = {"adapter": [{"method": "adalora", "targets": ["q_proj", "v_proj"], "init_r": 4, "target_r": 2,
                           "total_step": 10, "orth_reg_weight": 0.5}]}
    from modapt.testing.models import tiny_model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_dir(tmp_path / "base", task="causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = modapt.apply(AutoModelForCausalLM.from_pretrained(folder), recipe)
    rows = Dataset.from_list([{"input_ids": (ids % 13).tolist()} for ids in tiny_inputs(batch=4, padded=False)["input_ids"]])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, save_strategy="no", logging_strategy="no", dataloader_num_workers=0)
    plain = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    ours = hf_callback.with_modapt(trl.SFTTrainer)(model=model, args=args, train_dataset=rows,
                                                   processing_class=tokenizer)
    assert any(isinstance(c, hf_callback.ModaptCallback) for c in ours.callback_handler.callbacks)
    batch = next(iter(plain.get_train_dataloader()))
    model.train()
    with torch.no_grad():
        without = plain.compute_loss(model, dict(batch))
        with_reg = ours.compute_loss(model, dict(batch))
        term = modapt.regularization_loss(model)
    assert float(term) > 0
    torch.testing.assert_close(with_reg - without, term, atol=1e-6, rtol=1e-5)
    del modapt_adalora
