"""Bottleneck adapters: identity at init, each placement changes only its sub-blocks, exact detach."""

import modapt
import modapt_bottleneck.plugin
import pytest
import torch
from modapt.testing import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from modapt.testing.models import train_losses
from modapt.testing.conformance import model_output
from modapt_bottleneck.sites import sites_of

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
BLOCKS = {"llama": lambda m: m.model.layers, "gpt2": lambda m: m.transformer.h, "bert": lambda m: m.bert.encoder.layer}
ADAPTED = {"series": {"attn", "ffn"}, "parallel": {"attn", "ffn"}, "ffn": {"ffn"}}
KIND = {"series": "series", "parallel": "parallel", "ffn": "parallel"}


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt_bottleneck.plugin, name="bottleneck", distribution="modapt-bottleneck")
    return modapt_registry


def _recipe(placement, **opts):
    return {"adapter": [{"method": "bottleneck", "placement": placement, "r": 4, **opts}]}


def _perturb(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(modapt.trainable_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _branch(adapter, h):
    """up(act(down(h))) written out with the weight matrices (dropout off)."""
    z = h @ adapter.down.weight.t() + adapter.down.bias
    z = {"ReLU": torch.relu, "GELU": torch.nn.functional.gelu, "Tanh": torch.tanh}[type(adapter.act).__name__](z)
    return z @ adapter.up.weight.t() + adapter.up.bias


def _observe(block):
    """Record, for each site, the hidden input and the (args, kwargs, output) of the output module."""
    seen, handles = {}, []
    for name, site in sites_of(block).items():
        def pre(module, args, kwargs, name=name):
            seen.setdefault(name, {})["input"] = kwargs.get("hidden_states", args[0] if args else None)

        def post(module, args, kwargs, output, name=name):
            seen.setdefault(name, {}).update(args=args, kwargs=kwargs,
                                             output=output[0] if isinstance(output, tuple) else output)
        handles.append(site.input.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(site.output.register_forward_hook(post, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement", ["series", "parallel", "ffn"])
def test_identity_at_init(registry, family, placement):
    base = FACTORIES[family]()
    model = modapt.apply(FACTORIES[family](), _recipe(placement, activation="gelu"), registry=registry)
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement", ["series", "parallel", "ffn"])
def test_each_placement_changes_only_its_sub_blocks(registry, family, placement):
    """Every site's output = its unhooked output + (s · A(output) | s · A(input) | 0), by hand."""
    scale = 3.0
    model = modapt.apply(FACTORIES[family](), _recipe(placement, scale=scale), registry=registry)
    _perturb(model)
    block = BLOCKS[family](model)[0]
    seen, handles = _observe(block)
    with torch.no_grad():
        model_output(model, tiny_inputs())
        for name, site in sites_of(block).items():
            rec = seen[name]
            kwargs = {k: v for k, v in rec["kwargs"].items() if k not in ("past_key_values", "past_key_value", "cache")}
            # the cache is left out (transformers < 5.25 passes it as past_key_values, 5.25 as cache): a
            # replay must not append to it
            plain = site.output.forward(*rec["args"], **kwargs)   # .forward skips every hook (no cache reuse)
            plain = plain[0] if isinstance(plain, tuple) else plain
            delta = rec["output"] - plain
            if name not in ADAPTED[placement]:
                # recomputing GPT-2's attention differs by float rounding only; exact equality with
                # the base model is checked in the next test
                assert delta.abs().max() < 1e-6, f"{name} changed by placement {placement}"
                assert not hasattr(block, f"adapter_{name}")
                continue
            source = plain if KIND[placement] == "series" else rec["input"]
            expected = scale * _branch(getattr(block, f"adapter_{name}"), source)
            assert expected.abs().max() > 1e-3           # the adapter is not trivially zero
            torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_ffn_placement_leaves_attention_outputs_as_the_base_model(registry, family):
    """The first block's attention output equals the base model's; its FFN output does not."""
    base = FACTORIES[family]()
    model = modapt.apply(FACTORIES[family](), _recipe("ffn"), registry=registry)
    _perturb(model)
    seen_base, _ = _observe(BLOCKS[family](base)[0])
    seen, _ = _observe(BLOCKS[family](model)[0])
    with torch.no_grad():
        model_output(base, tiny_inputs())
        model_output(model, tiny_inputs())
    assert torch.equal(seen["attn"]["output"], seen_base["attn"]["output"])
    assert torch.equal(seen["ffn"]["input"], seen_base["ffn"]["input"])
    assert not torch.allclose(seen["ffn"]["output"], seen_base["ffn"]["output"], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_detach_restores_the_model_exactly(registry, family, placement):
    base = FACTORIES[family]()
    model = modapt.apply(FACTORIES[family](), _recipe(placement), registry=registry)
    _perturb(model)
    modapt.remove(model)
    inputs = tiny_inputs()
    assert model.state_dict().keys() == base.state_dict().keys()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs), atol=0, rtol=0)


def test_parameter_keys_and_shapes(registry):
    model = modapt.apply(tiny_llama(), _recipe("ffn", r=5), registry=registry)
    names = {n: tuple(p.shape) for n, p in modapt.trainable_parameters(model).items()}
    assert names == {f"model.layers.{i}.adapter_ffn.{k}": s for i in (0, 1) for k, s in
                     [("down.weight", (5, 64)), ("down.bias", (5,)), ("up.weight", (64, 5)), ("up.bias", (64,))]}
    up = model.model.layers[0].adapter_ffn.up
    assert torch.count_nonzero(up.weight) == 0 and torch.count_nonzero(up.bias) == 0


def test_default_scale_is_four_for_adapter_ffn_and_one_otherwise(registry):
    for placement, scale in [("ffn", 4.0), ("series", 1.0), ("parallel", 1.0)]:
        model = modapt.apply(tiny_llama(), _recipe(placement), registry=registry)
        attachment = next(iter(modapt.state_of(model).attachments.values()))[1]
        assert attachment.scale == scale


def test_a_module_that_is_not_a_block_is_a_clear_error(registry):
    with pytest.raises(modapt.RecipeError, match=r"cannot place a bottleneck adapter into a Linear.*LLaMA-style"):
        modapt.apply(tiny_llama(), {"adapter": [{"method": "bottleneck", "targets": ["q_proj"]}]}, registry=registry)


def test_unknown_placement_and_activation_name_the_accepted_values(registry):
    with pytest.raises(modapt.RecipeError, match="series.*parallel.*ffn.*pfeiffer"):
        modapt.apply(tiny_llama(), _recipe("serial"), registry=registry)
    with pytest.raises(modapt.RecipeError, match="relu"):
        modapt.apply(tiny_llama(), _recipe("ffn", activation="softsign"), registry=registry)


def test_adapter_ffn_trains_and_stays_after_merge(registry):
    model = modapt.apply(tiny_llama(), _recipe("ffn"), registry=registry)
    inputs = tiny_inputs()
    losses = train_losses(model, 15, inputs=inputs)
    assert losses[-1] < losses[0] - 0.05
    model.eval()
    with torch.no_grad():
        before = model_output(model, inputs)
        modapt.merge(model)                                  # not mergeable: the adapter stays active
        torch.testing.assert_close(model_output(model, inputs), before, atol=0, rtol=0)
    assert hasattr(model.model.layers[0], "adapter_ffn")


def test_beside_lora_in_the_same_blocks(registry, tmp_path):
    """LoRaDA-LA's shape: LoRA on o_proj/down_proj and Adapter-FFN in the same decoder layers."""
    import modapt.lora

    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    recipe = {"adapter": [{"method": "lora", "r": 2, "targets": ["o_proj", "down_proj"]},
                          {"method": "bottleneck", "placement": "ffn", "r": 4}]}
    model = modapt.apply(tiny_llama(), recipe, registry=registry)
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, inputs), model_output(tiny_llama(), inputs), atol=0, rtol=0)
    _perturb(model)
    keys = set(modapt.adapter_state_dict(model))
    assert "model.layers.0.adapter_ffn.up.weight" in keys and "model.layers.0.mlp.down_proj.lora_B.weight" in keys
    with torch.no_grad():
        expected = model_output(model, inputs)
        modapt.save(model, tmp_path / "a", registry=registry)
        loaded = modapt.load(tiny_llama(), tmp_path / "a", registry=registry)
        torch.testing.assert_close(model_output(loaded, inputs), expected, atol=0, rtol=0)
        modapt.merge(model)               # LoRA folds in; the bottleneck adapter stays
        torch.testing.assert_close(model_output(model, inputs), expected, atol=1e-5, rtol=1e-5)
        assert hasattr(model.model.layers[1], "adapter_ffn")
