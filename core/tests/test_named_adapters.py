"""Several named adapters on one model (issue 36), checked against models holding one adapter each,
one recipe holding both entries, the bare base, and PEFT's add_weighted_adapter."""


import pytest
import torch

import modapt
import modapt.lora
import modapt_dora.plugin
from modapt.errors import AdapterLoadError, StateError
from modapt.registry import Registry, use_registry
from modapt.testing.conformance import model_output, perturb
from modapt.testing.models import tiny_inputs, tiny_llama

A = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8.0}
B = {"method": "dora", "targets": ["q_proj", "v_proj", "up_proj"], "update": {"method": "lora", "r": 4}}
C = {"method": "lora", "targets": ["up_proj", "down_proj"], "r": 4, "lora_alpha": 16.0}


@pytest.fixture(scope="module")
def registry():
    registry = Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    registry.register_plugin(modapt_dora.plugin, name="dora", distribution="modapt-dora")
    with use_registry(registry):
        yield registry


def _single(entry, seed, registry):
    model = modapt.apply(tiny_llama(), {"adapter": [entry]}, registry=registry).eval()
    perturb(model, seed=seed)
    return model


@pytest.fixture(scope="module")
def world(registry, tmp_path_factory):
    """Three single-adapter reference models, and one base holding all three as a, b, c."""
    root = tmp_path_factory.mktemp("named")
    ref = {"a": _single(A, 1, registry), "b": _single(B, 2, registry), "c": _single(C, 3, registry)}
    modapt.save(ref["a"], root / "a")
    modapt.save(ref["b"], root / "b")
    multi = tiny_llama().eval()
    modapt.load(multi, root / "a", name="a", registry=registry)
    modapt.load(multi, root / "b", name="b", registry=registry)
    modapt.apply(multi, {"adapter": [C]}, name="c", registry=registry)
    live = dict(multi.named_parameters())
    with torch.no_grad():  # c's tensors from its reference, through the documented live names
        for key, value in modapt.adapter_state_dict(ref["c"]).items():
            path, _, own = key.partition(".lora_")
            live[f"{path}.modapt_adapters.c.lora_{own}"].copy_(value)
    return ref, multi, root


def test_each_adapter_alone_equals_its_own_model(world):
    ref, multi, _ = world
    inputs = tiny_inputs(batch=3)
    assert modapt.adapters(multi) == ["a", "b", "c"]
    for name in ("a", "b", "c"):
        modapt.set_active(multi, name)
        assert modapt.active(multi) == [name]
        with torch.no_grad():
            torch.testing.assert_close(model_output(multi, inputs), model_output(ref[name], inputs),
                                       atol=1e-5, rtol=0)
        trainable = set(modapt.trainable_parameters(multi))
        own = set(modapt.adapter_state_dict(ref[name]))
        if name == "a":  # the first adapter keeps the single-adapter names
            assert trainable == own
        else:
            assert len(trainable) == len(own) and all(f".modapt_adapters.{name}." in n for n in trainable)


def test_first_adapter_keeps_flat_names(world):
    ref, multi, _ = world
    names = dict(multi.named_parameters())
    for key in modapt.adapter_state_dict(ref["a"]):
        assert key in names
    assert any(".modapt_adapters.b." in n for n in names)


def test_two_active_equal_one_recipe_with_both(world, registry):
    ref, multi, _ = world
    both = modapt.apply(tiny_llama(), {"adapter": [A, C]}, registry=registry).eval()
    with torch.no_grad():
        live = dict(both.named_parameters())
        for name in ("a", "c"):
            for key, value in modapt.adapter_state_dict(ref[name]).items():
                live[key].copy_(value)
    modapt.set_active(multi, ["a", "c"])
    inputs = tiny_inputs(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(model_output(multi, inputs), model_output(both, inputs), atol=1e-5, rtol=0)


def test_rescaling_reparam_is_not_summed(world):
    _, multi, _ = world
    modapt.set_active(multi, "a")
    with pytest.raises(StateError, match=r"q_proj.*'b'.*'a'|q_proj.*'a'.*'b'"):
        modapt.set_active(multi, ["a", "b"])
    assert modapt.active(multi) == ["a"]


def test_disabled_is_the_base_bit_for_bit(world):
    _, multi, _ = world
    modapt.set_active(multi, ["a", "c"])
    inputs = tiny_inputs(batch=3)
    with torch.no_grad():
        base = model_output(tiny_llama().eval(), inputs)
        with modapt.disabled(multi):
            assert modapt.active(multi) == []
            out = model_output(multi, inputs)
        assert torch.equal(out, base)
        assert modapt.active(multi) == ["a", "c"]
        with modapt.disabled(multi), pytest.raises(StateError, match="inside modapt.disabled"):
            modapt.delete(multi, "a")
    assert modapt.adapters(multi) == ["a", "b", "c"]


def test_rows_mix_adapters_in_one_pass(world):
    ref, multi, _ = world
    inputs = tiny_inputs(batch=3)
    base = tiny_llama().eval()
    with torch.no_grad():
        with modapt.rows(multi, ["a", "b", None]):
            out = model_output(multi, inputs)
        for i, model in enumerate([ref["a"], ref["b"], base]):
            torch.testing.assert_close(out[i], model_output(model, inputs)[i], atol=1e-5, rtol=0)
        with pytest.raises(StateError, match="3 names but the batch has 2"), modapt.rows(multi, ["a", "b", None]):
            model_output(multi, tiny_inputs(batch=2))


def test_save_one_then_load_alone(world, registry, tmp_path):
    ref, multi, _ = world
    modapt.save(multi, tmp_path / "b", name="b")
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "b" / "modapt_adapter.safetensors")) == set(modapt.adapter_state_dict(ref["b"]))
    alone = modapt.load(tiny_llama().eval(), tmp_path / "b", registry=registry)
    assert modapt.adapters(alone) == ["b"]  # the folder remembers its name
    inputs = tiny_inputs(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(model_output(alone, inputs), model_output(ref["b"], inputs), atol=1e-5, rtol=0)
    with pytest.raises(StateError, match="pass name="):
        modapt.save(multi, tmp_path / "x")


def test_bad_input_leaves_the_model_unchanged(world, registry):
    _, multi, root = world
    before = {k: v.clone() for k, v in multi.state_dict().items()}
    with pytest.raises(StateError, match="did you mean 'c'"):
        modapt.set_active(multi, "cc")
    with pytest.raises(AdapterLoadError, match="already has an adapter named 'a'"):
        modapt.load(multi, root / "a", name="a", registry=registry)
    with pytest.raises(StateError, match="already has an adapter named 'c'"):
        modapt.apply(multi, {"adapter": [C]}, name="c", registry=registry)
    after = multi.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_combine_linear_matches_peft(world, registry):
    from peft import LoraConfig, get_peft_model

    ref, multi, _ = world
    modapt.combine(multi, {"a": 0.7, "c": 0.3}, name="ac", how="linear")
    modapt.set_active(multi, "ac")
    peft_model = get_peft_model(tiny_llama().eval(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                adapter_name="x")
    peft_model.add_adapter("y", LoraConfig(r=4, lora_alpha=16, target_modules=["up_proj", "down_proj"]))
    live, peft_name = dict(peft_model.named_parameters()), {"a": "x", "c": "y"}
    with torch.no_grad():
        for name in ("a", "c"):
            for key, value in modapt.adapter_state_dict(ref[name]).items():
                path, _, own = key.rpartition(".lora_")
                factor, _, rest = own.partition(".")
                live[f"base_model.model.{path}.lora_{factor}.{peft_name[name]}.{rest}"].copy_(value)
    peft_model.add_weighted_adapter(["x", "y"], [0.7, 0.3], "ac", combination_type="linear")
    peft_model.set_adapter("ac")
    peft_model.eval()
    inputs = tiny_inputs(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(model_output(multi, inputs), peft_model(**inputs).logits, atol=1e-5, rtol=0)
    with pytest.raises(StateError, match="rescales the whole weight"):
        modapt.combine(multi, {"a": 0.5, "b": 0.5}, name="ab")
    modapt.delete(multi, "ac")
    assert modapt.adapters(multi) == ["a", "b", "c"]


class _Recorder:
    """A plugin whose after-step hook records the adapter holders it is shown."""

    seen: list = []

    @modapt.hookimpl
    def modapt_after_optimizer_step(self, model, step):
        self.seen.append(dict(modapt.state_of(model).layers))


def test_training_hooks_see_the_active_adapters_only(world, registry):
    _, multi, _ = world
    recorder = _Recorder()
    registry.register_plugin(recorder, name="recorder")
    try:
        modapt.set_active(multi, ["a", "c"])
        modapt.after_optimizer_step(multi, 0, registry=registry)
        modapt.set_active(multi, "b")
        modapt.after_optimizer_step(multi, 1, registry=registry)
    finally:
        registry.unregister_plugin("recorder")
    first, second = recorder.seen
    every = dict(multi.named_modules())
    assert all(every[key] is holder for key, holder in first.items())  # keyed by their module paths
    assert sorted(k.rsplit(".", 1)[-1] for k in first if ".modapt_adapters." not in k) == ["q_proj"] * 2 + ["v_proj"] * 2
    assert {k.split(".modapt_adapters.")[1] for k in first if ".modapt_adapters." in k} == {"c"}
    assert {k.split(".modapt_adapters.")[1] for k in second} == {"b"} and len(second) == 6


def test_combine_cat_and_svd_are_the_weighted_sum(world):
    """cat is Σ w_i ΔW_i exactly; svd at full rank too: both equal a and c active with c's ΔW scaled."""
    _, multi, _ = world
    modapt.set_active(multi, ["a", "c"])
    inputs = tiny_inputs(batch=3)
    with torch.no_grad():
        summed = model_output(multi, inputs)
        for how, rank in (("cat", None), ("svd", 8)):
            modapt.combine(multi, {"a": 1.0, "c": 1.0}, name=how, how=how, svd_rank=rank)
            modapt.set_active(multi, how)
            torch.testing.assert_close(model_output(multi, inputs), summed, atol=1e-5, rtol=0)
            modapt.delete(multi, how)


def test_merge_one_named_adapter(world, registry, tmp_path):
    ref, _, root = world
    modapt.save(ref["c"], tmp_path / "c")
    model = modapt.load(tiny_llama().eval(), root / "a", name="a", registry=registry)
    modapt.load(model, tmp_path / "c", name="c", registry=registry)
    with pytest.raises(StateError, match="pass name="):
        modapt.merge(model)
    modapt.merge(model, name="c")
    assert modapt.adapters(model) == ["a"] and modapt.active(model) == ["a"]
    both = modapt.apply(tiny_llama(), {"adapter": [A, C]}, registry=registry).eval()
    with torch.no_grad():
        live = dict(both.named_parameters())
        for name in ("a", "c"):
            for key, value in modapt.adapter_state_dict(ref[name]).items():
                live[key].copy_(value)
        inputs = tiny_inputs(batch=3)
        torch.testing.assert_close(model_output(model, inputs), model_output(both, inputs), atol=1e-5, rtol=0)
