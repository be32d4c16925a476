"""Each rule of composition: its error message names the rule and both adapters; nothing is applied.

The rules read capability data, so fake methods whose capabilities say "no" are refused while
real methods with the same family are accepted: no method name decides anything.
"""

from __future__ import annotations

import types

import modapt
import pytest
from modapt import Capabilities, Method, Options


class NoOptions(Options):
    pass


def fake(name: str, family: str, composes_with: set[str], default_targets=None) -> Method:
    def build(*args):  # never called: the rules refuse before any model is touched
        raise AssertionError("a refused recipe reached build")

    return Method(name=name, family=family, options=NoOptions, build=build, own_keys=(),
                  capabilities=Capabilities(mergeable=family in ("update", "reparam"),
                                            composes_with=frozenset(composes_with)),
                  default_targets=default_targets)


def register_fakes(registry, *methods: Method) -> None:
    def modapt_register_methods(register):
        for method in methods:
            register(method)

    plugin = types.SimpleNamespace(modapt_register_methods=modapt.hookimpl(modapt_register_methods))
    registry.register_plugin(plugin, "fakes", "fake-methods")


def refused(registry, recipe: dict) -> str:
    with pytest.raises(modapt.RecipeError) as info:
        modapt.parse_recipe(recipe, registry)
    return str(info.value)


# ---------------------------------------------------------------- weights on one weight
def test_two_updates_on_one_weight(registry, helpers):
    helpers.need(registry, "lorma")
    message = refused(registry, {"adapter": [
        {"method": "lora", "targets": ["q_proj", "v_proj"]},
        {"method": "lorma", "targets": ["v_proj"]}]})
    assert "rule 'two updates on one weight without a reparam that says how'" in message
    assert "adapter[0] (lora)" in message and "adapter[1] (lorma)" in message and "'v_proj'" in message
    assert message.startswith("adapter[1].targets: ")


def test_an_update_beside_a_reparam_on_one_weight(registry, helpers):
    helpers.need(registry, "map")
    message = refused(registry, {"adapter": [
        {"method": "map", "targets": ["q_proj"], "update": {"method": "lora"}},
        {"method": "lora", "targets": ["q_proj"]}]})
    assert "two updates on one weight without a reparam that says how" in message
    assert "adapter[0] (map over lora)" in message and "adapter[1] (lora)" in message


def test_two_reparams_on_one_weight(registry, helpers):
    helpers.need(registry, "map", "dora")
    message = refused(registry, {"adapter": [
        {"method": "map", "targets": ["q_proj"], "update": {"method": "lora"}},
        {"method": "dora", "targets": ["k_proj", "q_proj"]}]})
    assert "rule 'two reparams on one weight'" in message
    assert "adapter[0] (map over lora)" in message and "adapter[1] (dora over lora)" in message


def test_a_preset_and_an_own_entry_on_one_weight(registry, helpers):
    helpers.need(registry, "map")
    message = refused(registry, {"preset": "lomap", "adapter": [{"method": "lora", "targets": ["up_proj"]}]})
    assert "adapter[0] (map over lora)" in message and "adapter[1] (lora)" in message and "'up_proj'" in message


def test_disjoint_weights_and_patterns_pass(registry, helpers):
    helpers.need(registry, "map")
    # literal targets only: 're:' patterns and class names need the model (the core checks at apply)
    modapt.parse_recipe({"adapter": [
        {"method": "map", "targets": ["q_proj"], "update": {"method": "lora"}},
        {"method": "lora", "targets": ["v_proj", "re:.*q_proj"]}]}, registry)


# ---------------------------------------------------------------- reparam over update
def test_a_reparam_that_does_not_wrap_updates(registry):
    register_fakes(registry, fake("rigid", "reparam", {"attention", "module"}))
    message = refused(registry, {"adapter": [{"method": "rigid", "targets": ["q_proj"], "update": {"method": "lora"}}]})
    assert "rule 'a reparam wraps an update'" in message
    assert "adapter[0] ('rigid', a reparam)" in message and "adapter[0].update is 'lora'" in message


def test_an_update_that_refuses_a_reparam(registry, helpers):
    helpers.need(registry, "map")
    register_fakes(registry, fake("loner", "update", {"attention", "module"}))
    message = refused(registry, {"adapter": [{"method": "map", "targets": ["q_proj"], "update": {"method": "loner"}}]})
    assert "rule 'an update under a reparam'" in message
    assert "adapter[0].update ('loner', an update)" in message and "adapter[0] ('map') wraps it" in message
    assert message.startswith("adapter[0].update: ")


def test_the_core_reparam_wraps_any_update(registry):
    # additive is W0 + ΔW, what an update alone gets: writing it out asks nothing of the update
    register_fakes(registry, fake("loner", "update", {"attention", "module"}))
    modapt.parse_recipe({"adapter": [{"method": "additive", "targets": ["q_proj"], "update": {"method": "loner"}}]},
                        registry)


# ---------------------------------------------------------------- attention and module adapters
def test_lmam_on_a_weight(registry, helpers):
    helpers.need(registry, "lmam")
    message = refused(registry, {"adapter": [
        {"method": "lora", "targets": ["q_proj", "v_proj"]},
        {"method": "lmam", "targets": ["q_proj"]}]})
    assert "rule 'lmam on a non-attention module'" in message
    assert "adapter[1] (lmam) targets 'q_proj'" in message and "adapter[0] (lora) adapts as a weight" in message


def test_lmam_on_all_linear(registry, helpers):
    helpers.need(registry, "lmam")
    message = refused(registry, {"adapter": [{"method": "lora", "targets": ["v_proj"]},
                                             {"method": "lmam", "targets": ["all-linear"]}]})
    assert "rule 'lmam on a non-attention module'" in message and "'all-linear'" in message


def test_a_module_adapter_on_a_weight(registry, helpers):
    helpers.need(registry, "bottleneck")
    message = refused(registry, {"adapter": [{"method": "lora", "targets": ["down_proj"]},
                                             {"method": "bottleneck", "targets": ["down_proj"]}]})
    assert "rule 'a module adapter on a weight'" in message and "adapter[1] (bottleneck)" in message


def test_two_attention_adapters_on_their_default_targets(registry, helpers):
    helpers.need(registry, "lmam")
    message = refused(registry, {"adapter": [{"method": "lmam"}, {"method": "lmam", "r": 4}]})
    assert "rule 'one attention adapter per module'" in message
    assert "adapter[0] (lmam) and adapter[1] (lmam) both target their default targets" in message


def test_an_attention_adapter_that_does_not_stack_on_weights(registry):
    register_fakes(registry, fake("solo_attn", "attention", {"module"}, default_targets=lambda model: []))
    message = refused(registry, {"adapter": [{"method": "lora", "targets": ["q_proj"]}, {"method": "solo_attn"}]})
    assert "rule 'an attention adapter beside weight adapters'" in message
    assert "adapter[1] ('solo_attn', attention) does not declare that it composes with update" in message
    assert "adapter[0] (lora) is update" in message


def test_a_weight_adapter_that_does_not_stack_with_attention(registry, helpers):
    helpers.need(registry, "lmam")
    register_fakes(registry, fake("plain", "update", {"reparam"}))
    message = refused(registry, {"adapter": [{"method": "plain", "targets": ["q_proj"]}, {"method": "lmam"}]})
    assert "rule 'an attention adapter beside weight adapters'" in message
    assert "adapter[0] ('plain', update) does not declare that it composes with attention" in message
    assert "adapter[1] (lmam) is attention" in message


def test_a_module_adapter_that_does_not_stack_with_attention(registry, helpers):
    helpers.need(registry, "lmam")
    register_fakes(registry, fake("solo_block", "module", {"update", "reparam"}, default_targets=lambda model: []))
    message = refused(registry, {"adapter": [{"method": "lmam"}, {"method": "solo_block"}]})
    assert "rule 'a module adapter beside an attention adapter'" in message
    assert "adapter[1] ('solo_block', module) does not declare that it composes with attention" in message


def test_nothing_is_applied_when_a_rule_refuses(registry, helpers):
    helpers.need(registry, "lorma")
    from modapt.testing import tiny_llama

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(modapt.RecipeError, match="two updates on one weight"):
        modapt.apply(model, {"adapter": [{"method": "lora", "targets": ["q_proj"]},
                                         {"method": "lorma", "targets": ["q_proj"]}]}, registry=registry)
    assert not modapt.is_adapted(model)
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())


def test_every_preset_passes_the_rules(registry):
    for name in registry.presets:
        overrides = {"adalora": {"total_step": 10}} if name == "adalomap" else {}
        try:
            modapt.parse_recipe({"preset": name, "overrides": overrides} if overrides else {"preset": name}, registry)
        except modapt.RecipeError as exc:
            assert "not installed" in str(exc), str(exc)
