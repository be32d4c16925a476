"""DoRA equals PEFT 0.21's ``LoraConfig(use_dora=True)`` on the same weights.

Both sides start from the same tiny model; modapt's adapter is moved off its init, then A, B
and the magnitude are copied into PEFT under PEFT's names (the mapping in ``PEFT_FORMAT``).
Forward (eval and train with dropout), gradients and merged weights are compared in float32.
"""

from __future__ import annotations

import pytest
import torch

import modapt
import modapt.lora
import modapt_dora.plugin
from modapt.testing import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from modapt.testing.conformance import model_output, perturb

peft = pytest.importorskip("peft")

# family -> (factory, task, targets); every layer kind PEFT's DoRA supports: Linear, GPT-2's
# Conv1D (fan_in_fan_out), Embedding
CASES = {
    "llama": (tiny_llama, "causal-lm", ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens"]),
    "gpt2": (tiny_gpt2, "causal-lm", ["c_attn", "c_proj", "c_fc"]),
    "bert": (tiny_bert, "sequence-classification", ["query", "value", "dense", "word_embeddings"]),
}
R, ALPHA = 4, 8.0
REL = 1e-5


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_dora.plugin, name="dora", distribution="modapt-dora")
    return modapt_registry


def build_pair(family, registry, dropout=0.0, perturbed=True):
    factory, task, targets = CASES[family]
    recipe = {"adapter": [{"method": "dora", "targets": targets,
                           "update": {"method": "lora", "r": R, "lora_alpha": ALPHA, "dropout": dropout}}]}
    ours = modapt.apply(factory(task=task), recipe, registry=registry)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=targets, use_dora=True)
    theirs = peft.get_peft_model(factory(task=task), config)
    if perturbed:
        perturb(ours, seed=3, scale=0.2)
        copy_into_peft(ours, theirs)
    return ours, theirs


def peft_name(path, key, embedding):
    """PEFT's name of modapt's ``key`` in a live PeftModel (adapter "default"): the file key of
    ``PEFT_FORMAT`` with the adapter name where PEFT's ModuleDict (``lora_A.default.weight``,
    ``lora_magnitude_vector.default.weight``) or ParameterDict (``lora_embedding_A.default``) puts it."""
    fmt = modapt_dora.plugin.PEFT_FORMAT
    file_key = fmt.file_keys("embedding" if embedding else None)[key]
    if file_key.startswith("lora_embedding_"):
        live = file_key + ".default"
    else:
        live = file_key.removesuffix(".weight") + ".default.weight"
    return fmt.prefix + f"{path}.{live}"


@torch.no_grad()
def copy_into_peft(ours, theirs):
    params = dict(theirs.named_parameters())
    copied = 0
    for path, host in modapt.state_of(ours).layers.items():
        for key in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            params[peft_name(path, key, host.kind == "embedding")].copy_(host.get_parameter(key))
            copied += 1
    assert copied == sum(1 for n, p in theirs.named_parameters() if p.requires_grad)


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("family", sorted(CASES))
def test_magnitude_init_equals_peft(family, registry):
    ours, theirs = build_pair(family, registry, perturbed=False)
    params = dict(theirs.named_parameters())
    for path, host in modapt.state_of(ours).layers.items():
        want = params[peft_name(path, "lora_magnitude_vector", host.kind == "embedding")]
        assert rel_err(host.lora_magnitude_vector, want) < REL, path
        # and it is ‖W0‖_row written out (ΔW = 0 at LoRA's init)
        w0 = host.base_layer.weight if host.kind == "linear" else host.base_layer.weight.t()
        torch.testing.assert_close(host.lora_magnitude_vector, w0.norm(dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", sorted(CASES))
def test_eval_forward_and_merged_weights_equal_peft(family, registry):
    ours, theirs = build_pair(family, registry)
    inputs = tiny_inputs()
    with torch.no_grad():
        want = model_output(theirs, inputs)
        got = model_output(ours, inputs)
        base = model_output(CASES[family][0](task=CASES[family][1]), inputs)
    assert rel_err(got - base, want - base) < 1e-3  # the adapter's own contribution, not only the base
    assert rel_err(got, want) < REL
    merged_ours = modapt.merge(ours, unload=True)
    merged_theirs = theirs.merge_and_unload()
    theirs_weights = dict(merged_theirs.named_parameters())
    for name, param in merged_ours.named_parameters():
        assert rel_err(param, theirs_weights[name]) < REL, name


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("family", sorted(CASES))
def test_train_forward_and_gradients_equal_peft(family, dropout, registry):
    """Training mode. Dropout 0.3: the same seed gives the same masks on both sides (PEFT
    recomputes the base on the dropped input). Dropout 0: the fused path (modapt_dora.fused)
    on the linear and Conv1D layers. Gradients of A, B and m agree too."""
    ours, theirs = build_pair(family, registry, dropout=dropout)
    ours.train()
    theirs.train()
    inputs = tiny_inputs()
    torch.manual_seed(123)
    got = model_output(ours, inputs)
    torch.manual_seed(123)
    want = model_output(theirs, inputs)
    assert rel_err(got, want) < REL
    got.pow(2).mean().backward()
    want.pow(2).mean().backward()
    params = dict(theirs.named_parameters())
    for path, host in modapt.state_of(ours).layers.items():
        for key in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            g_ours = host.get_parameter(key).grad
            g_theirs = params[peft_name(path, key, host.kind == "embedding")].grad
            assert rel_err(g_ours, g_theirs) < 1e-4, f"{path}.{key}"


@pytest.mark.parametrize("family", sorted(CASES))
def test_dropout_changes_the_train_forward(family, registry):
    """The dropout path is exercised: with dropout the train output differs from eval's."""
    ours, _ = build_pair(family, registry, dropout=0.3)
    inputs = tiny_inputs()
    with torch.no_grad():
        evaluated = model_output(ours.eval(), inputs)
        for module in ours.modules():  # the model's own dropouts off, the adapter's on
            if isinstance(module, torch.nn.Dropout):
                module.eval()
        for host in modapt.state_of(ours).layers.values():
            host.train()
            if hasattr(host, "lora_dropout"):
                host.lora_dropout.train()
        trained = model_output(ours, inputs)
    assert rel_err(trained, evaluated) > 1e-4
