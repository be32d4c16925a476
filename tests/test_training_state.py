"""Plugin training state in Trainer checkpoints: resumed runs end where uninterrupted runs end.

AdaLoRA across its allocation phase (the importance averages and budget are state outside the
adapter tensors: the checkpoint must carry them) and LoMAP with the stepwise schedule (its turn
follows from the step the Trainer restores). The reference is the uninterrupted run of the same
Trainer (same seed, data order, float32 on the CPU); each resumed run starts from perturbed
adapter values, so only the checkpoint can bring it to the same end.
"""

from __future__ import annotations

import json

import modapt
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama

hf_callback = pytest.importorskip("modapt.hf_callback")
pytest.importorskip("modapt_adalora")
pytest.importorskip("modapt_map")

ADALORA = {"adapter": [{"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 8, "tinit": 1,
                        "tfinal": 2, "deltaT": 1, "targets": ["q_proj", "v_proj", "up_proj"]}]}
LOMAP = {"adapter": [{"method": "map", "schedule": "stepwise", "period": 2, "targets": ["q_proj", "v_proj"],
                      "update": {"method": "lora", "r": 4, "lora_alpha": 8}}]}


def data():
    inputs = tiny_inputs(batch=16, padded=False, seed=5)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in inputs["input_ids"]]


def trainer(model, out):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=2, learning_rate=2e-2,
                             report_to=[], save_strategy="steps", save_steps=4, logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, seed=11)
    return hf_callback.ModaptTrainer(model=model, args=args, train_dataset=data())


def state(model) -> dict[str, torch.Tensor]:
    """Every adapter tensor and buffer (AdaLoRA's rank_pattern included)."""
    return {k: v.detach().clone() for k, v in modapt.adapter_state_dict(model).items()}


def perturbed(recipe):
    model = modapt.apply(tiny_llama(), recipe)
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))
    return model


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_adalora_resumed_inside_the_allocation_phase_ends_where_the_run_ends(tmp_path):
    from modapt_adalora.allocator import ranks

    model = modapt.apply(tiny_llama(), ADALORA)
    trainer(model, tmp_path / "run").train()
    final, final_ranks = state(model), ranks(model)
    checkpoint = tmp_path / "run" / "checkpoint-4"  # step 4 of 8: tinit 1 < 4 <= total - tfinal = 6
    saved = modapt.training.read_training_state(checkpoint)["adalora"]
    assert saved.values["groups"][0]["scored"] and saved.tensors  # averages mid-allocation
    init_budget = 4 * len(saved.values["groups"][0]["layers"])
    assert 2 * len(saved.values["groups"][0]["layers"]) < saved.values["groups"][0]["budget"] < init_budget  # shrinking

    other = perturbed(ADALORA)
    trainer(other, tmp_path / "run").train(resume_from_checkpoint=str(checkpoint))
    assert ranks(other) == final_ranks
    assert max_diff(state(other), final) <= 1e-6

    # without the state file the averages restart from zero: the run ends elsewhere (the check bites)
    (checkpoint / modapt.training.TRAINING_STATE_FILE).unlink()
    again = perturbed(ADALORA)
    with pytest.warns(UserWarning, match="starts afresh"):
        trainer(again, tmp_path / "run").train(resume_from_checkpoint=str(checkpoint))
    assert max_diff(state(again), final) > 1e-4


def test_lomap_stepwise_resumed_ends_where_the_run_ends(tmp_path):
    model = modapt.apply(tiny_llama(), LOMAP)
    trainer(model, tmp_path / "run").train()
    final = state(model)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert not (checkpoint / modapt.training.TRAINING_STATE_FILE).exists()  # nothing beyond the step
    other = perturbed(LOMAP)
    trainer(other, tmp_path / "run").train(resume_from_checkpoint=str(checkpoint))
    assert max_diff(state(other), final) <= 1e-6


def test_state_files_that_do_not_fit_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    model = modapt.apply(tiny_llama(), ADALORA)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / modapt.training.TRAINING_STATE_FILE

    def write(values, tensors=None):
        meta = {"modapt_training_state": json.dumps({"format": 1, "plugins": values})}
        save_file(tensors or {}, str(path), metadata=meta)

    write({"unknown-plugin": {}})
    with pytest.raises(modapt.StateError, match="'unknown-plugin', which no installed plugin takes back"):
        modapt.load_training_state(model, folder)
    layers = sorted(p for p in modapt.state_of(model).layers)
    write({"adalora": {"groups": [{"layers": layers[:1], "budget": 3, "scored": False}]}})
    with pytest.raises(modapt.ModaptError, match="other layers"):
        modapt.load_training_state(model, folder)
    name = f"0.{layers[0]}.lora_A.sensitivity"
    write({"adalora": {"groups": [{"layers": layers, "budget": 3, "scored": True}]}},
          {f"adalora/{name}": torch.zeros(1, 2)})
    with pytest.raises(modapt.ModaptError, match="is \\[1, 2\\], the parameter is"):
        modapt.load_training_state(model, folder)


def test_callback_alone_makes_adapter_checkpoints_that_the_mixin_resumes(tmp_path):
    """A plain Trainer with ModaptCallback: each checkpoint becomes an adapter folder (no whole
    model, the plugin state beside it); a ModaptTrainer resumes from it to the same end."""
    from transformers import Trainer

    # a callback cannot add AdaLoRA's regulariser to a plain Trainer's loss: compare without it
    recipe = {"adapter": [{**ADALORA["adapter"][0], "orth_reg_weight": 0.0}]}
    model = modapt.apply(tiny_llama(), recipe)
    plain = trainer(model, tmp_path / "run")
    Trainer(model=model, args=plain.args, train_dataset=data(), callbacks=[hf_callback.ModaptCallback()]).train()
    final = state(model)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert not list(checkpoint.glob("model*.safetensors")) and (checkpoint / "optimizer.pt").is_file()
    assert (checkpoint / modapt.training.TRAINING_STATE_FILE).is_file()
    modapt.load(tiny_llama(), checkpoint)  # an adapter folder
    other = perturbed(recipe)
    trainer(other, tmp_path / "run").train(resume_from_checkpoint=str(checkpoint))
    assert max_diff(state(other), final) <= 1e-6
