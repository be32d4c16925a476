"""A Hugging Face Trainer drives AdaLoRA through the core's callback (modapt.hf_callback)."""

from __future__ import annotations

import modapt
import modapt_adalora
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama


def test_modapt_trainer_runs_the_schedule_to_its_target(registry, tmp_path):
    hf_callback = pytest.importorskip("modapt.hf_callback")
    from transformers import TrainingArguments

    # 8 optimizer steps (global_step 0..7); the final allocation is at total_step - tfinal = 5
    recipe = {"adapter": [{"method": "adalora", "targets": ["q_proj", "v_proj"], "init_r": 4, "target_r": 2,
                           "total_step": 7, "tinit": 1, "tfinal": 2, "orth_reg_weight": 0.1}]}
    model = modapt.apply(tiny_llama(), recipe, registry=registry)
    inputs = tiny_inputs(batch=8, padded=False, seed=3)
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in inputs["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0)
    trainer = hf_callback.ModaptTrainer(model=model, args=args, train_dataset=data)
    layers = modapt_adalora.allocator.adalora_layers(model)
    before = {path: host.lora_A.detach().clone() for path, host in layers.items()}
    trainer.train()
    assert sum(modapt_adalora.ranks(model).values()) == 2 * 4   # the final allocation ran (step 5)
    for path, host in layers.items():
        assert not torch.equal(host.lora_A, before[path])            # trained
        assert (host.lora_E[~host.rank_pattern] == 0).all()          # pruned triplets stay pruned (steps 6, 7)
        assert (host.lora_E[host.rank_pattern] != 0).all()
