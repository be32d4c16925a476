"""LoRA numerics equal PEFT 0.21's on the same weights (an independent implementation)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import modapt
from modapt.testing import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama

CASES = {
    # family: (factory, targets: Linear/Conv1D and an embedding, fan_in_fan_out)
    "llama": (tiny_llama, ["q_proj", "v_proj", "gate_proj", "embed_tokens"], False),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], True),
    "gpt2-embedding": (tiny_gpt2, ["wpe"], False),
    "bert": (tiny_bert, ["query", "value", "word_embeddings"], False),
}


def _peft_twin(name: str, peft_model) -> torch.Tensor:
    """PEFT's tensor for one of our parameter names (``<path>.lora_A.weight``)."""
    path, _, key = name.rpartition(".lora_")
    which = key.split(".")[0]  # "A" or "B"
    params = dict(peft_model.named_parameters())
    for candidate in (f"base_model.model.{path}.lora_{which}.default.weight",
                      f"base_model.model.{path}.lora_embedding_{which}.default"):
        if candidate in params:
            return params[candidate]
    raise KeyError(name)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_merge_match_peft(case, rslora):
    factory, targets, fan_in_fan_out = CASES[case]
    ours = modapt.apply(factory(), {"adapter": [
        {"method": "lora", "r": 4, "lora_alpha": 12.0, "use_rslora": rslora, "targets": targets}]})
    theirs = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=12, use_rslora=rslora, target_modules=targets,
                                                  fan_in_fan_out=fan_in_fan_out))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in modapt.trainable_parameters(ours).items():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            twin = _peft_twin(name, theirs)
            # PEFT stores embedding factors as raw parameters: A [r, num_embeddings], B [dim, r], like ours
            twin.copy_(param if twin.shape == param.shape else param.t())
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours(**inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        merged_theirs = theirs.merge_and_unload()
        modapt.merge(ours)
        for name, param in merged_theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], param, atol=1e-6, rtol=1e-6, msg=name)


def test_initialisation_matches_peft_distribution():
    """A is Kaiming-uniform(a=√5) (bound 1/√in), B zeros; embeddings: A zeros, B standard normal."""
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "r": 8, "targets": ["q_proj", "embed_tokens"]}]})
    q = model.model.layers[0].self_attn.q_proj
    bound = 1 / 64 ** 0.5
    assert q.lora_A.weight.abs().max() <= bound and q.lora_A.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(q.lora_B.weight) == 0
    emb = model.model.embed_tokens
    assert torch.count_nonzero(emb.lora_A.weight) == 0
    assert 0.8 < emb.lora_B.weight.std() < 1.2


def test_dropout_only_on_the_adapter_input():
    """In training, dropout changes only the adapter's path: with B = 0 the output is the base's."""
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "r": 4, "dropout": 0.5,
                                                     "targets": ["q_proj"]}]})
    base = tiny_llama()
    model.train()
    inputs = tiny_inputs()
    torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, atol=1e-6, rtol=0)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B.weight.normal_()
    x = torch.randn(4, 64)
    outs = {tuple(q(x).flatten()[:5].tolist()) for _ in range(3)}
    assert len(outs) > 1, "dropout is not active in training mode"
    model.eval()
    assert torch.equal(q(x), q(x))


def test_frobenius_closed_form_equals_materialised():
    model = modapt.apply(tiny_gpt2(), {"adapter": [{"method": "lora", "r": 3, "targets": ["c_fc"]}]})
    host = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        host.lora_B.weight.normal_()
    w0 = modapt.layers.weight_of(host.base_layer)
    delta = host.update.delta_weight(w0)
    assert delta.shape == w0.shape == (256, 64)
    torch.testing.assert_close(host.update.frobenius_sq(w0), delta.pow(2).sum(), rtol=1e-5, atol=0)
    # Conv1D stores [in, out]: x @ (W + ΔWᵀ) is the adapted output
    x = torch.randn(2, 64)
    torch.testing.assert_close(host(x), x @ (host.base_layer.weight + delta.t()) + host.base_layer.bias,
                               atol=1e-5, rtol=1e-5)
