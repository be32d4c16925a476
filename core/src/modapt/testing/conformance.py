"""The conformance suite every method plugin runs (the model: PEFT's shared tests).

Subclass :class:`MethodConformance` in your plugin's ``tests/test_conformance.py``::

    from modapt.testing.conformance import MethodConformance
    import modapt_map.plugin

    class TestMapConformance(MethodConformance):
        plugins = {"map": modapt_map.plugin}          # registered in an isolated registry
        recipes = {                                    # tiny model family -> recipe
            "llama": {"adapter": [{"method": "map", "targets": ["q_proj", "v_proj"],
                                   "update": {"method": "lora", "r": 4}}]},
            "gpt2": {...},
            "bert": {...},
        }

Every test runs once per family in ``recipes`` (``llama``, ``gpt2``, ``bert``; see
:mod:`modapt.testing.models`). The quantized family (``test_quantized_base_*``) runs the
``llama`` recipe on the tiny LLaMA loaded in 4-bit (bitsandbytes nf4) and in 8-bit (LLM.int8)
(:mod:`modapt.testing.quantized_models`); it is skipped when bitsandbytes is not installed.
What a test expects follows the capability flags the methods
declare (``mergeable``, ``identity_at_init``), never the method's name. Plugins register in
a fresh registry with autoloading off, so a plugin's tests do not depend on what else is
installed; the core's LoRA is always registered.
"""

from __future__ import annotations

import copy

import pytest
import torch

import modapt
from modapt.adapted_layer import AdaptedLayer
from modapt.registry import Registry, use_registry
from modapt.testing.models import MODEL_FACTORIES, tiny_inputs

FAMILY_TASKS = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "sequence-classification"}


def model_output(model, inputs) -> torch.Tensor:
    """The model's main output tensor (logits, or the last hidden state)."""
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@torch.no_grad()
def perturb(model, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable parameter away from its init, deterministically (a non-trivial adapter)."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(modapt.trainable_parameters(model).items()):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        param.add_((noise * scale * (1 + param.detach().float().abs().mean())).to(param.dtype))


class MethodConformance:
    """Abstract conformance tests; see the module docstring. Not collected until subclassed."""

    plugins: dict = {}
    recipes: dict = {}
    #: fp32 tolerance for merged vs unmerged outputs
    merge_atol: float = 1e-5
    #: tolerance for "equals the base model at init"
    identity_atol: float = 1e-6
    #: quantized bases of the quantized family (keys of modapt.testing.quantized_models.QUANTIZED_BASES)
    quantized_bases: tuple[str, ...] = ("bnb-nf4", "bnb-int8")

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture
    def registry(self):
        import modapt.lora

        registry = Registry(autoload=False)
        registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
        for name, plugin in self.plugins.items():
            if name != "lora":
                registry.register_plugin(plugin, name=name, distribution=f"modapt-{name}")
        with use_registry(registry):
            yield registry

    @pytest.fixture
    def family(self, conformance_family):
        return conformance_family

    def build(self, family: str, **kwargs):
        return MODEL_FACTORIES[family](task=FAMILY_TASKS[family], **kwargs)

    def adapted(self, family, registry, **kwargs):
        return modapt.apply(self.build(family, **kwargs), self.recipes[family], registry=registry)

    def methods(self, family, registry):
        recipe = modapt.parse_recipe(self.recipes[family], registry)
        return [registry.method(m) for m in recipe.methods()]

    # ------------------------------------------------------------------ tests
    def test_identity_at_init(self, family, registry):
        methods = self.methods(family, registry)
        if not all(m.capabilities.identity_at_init for m in methods):
            pytest.skip("a method of this recipe does not promise identity at init (capability flag)")
        base = self.build(family)
        model = self.adapted(family, registry)
        inputs = tiny_inputs()
        with torch.no_grad():
            torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs),
                                       atol=self.identity_atol, rtol=0)

    def test_only_adapter_parameters_train(self, family, registry):
        base_names = {n for n, _ in self.build(family).named_parameters()}
        model = self.adapted(family, registry)
        state = modapt.state_of(model)
        trainable = modapt.trainable_parameters(model)
        assert trainable, "the recipe made nothing trainable"
        saved_modules = tuple(f"{p}." for p in state.modules_to_save)
        for name in trainable:
            assert name not in base_names or name.startswith(saved_modules), f"base parameter {name} is trainable"
        for name, param in model.named_parameters():
            if name not in trainable:
                assert not param.requires_grad
        inputs = tiny_inputs()
        model.train()
        model_output(model, inputs).float().pow(2).mean().backward()
        for name, param in model.named_parameters():
            if name in trainable:
                assert param.grad is not None, f"adapter parameter {name} got no gradient"
                assert torch.isfinite(param.grad).all(), f"adapter parameter {name} got a non-finite gradient"
            else:
                assert param.grad is None, f"frozen parameter {name} got a gradient"

    def test_parameter_names_are_the_documented_keys(self, family, registry):
        model = self.adapted(family, registry)
        state = modapt.state_of(model)
        for path, host in state.layers.items():
            expected = set(registry.method(host.update.method_name).own_keys)
            if host.reparam.method_name != "additive":
                expected |= set(registry.method(host.reparam.method_name).own_keys)
            got = {n for n, _ in host.named_parameters() if not n.startswith("base_layer.")}
            assert got == expected, f"{path}: parameters {sorted(got)}, documented keys {sorted(expected)}"
        for path, (method_name, _) in state.attachments.items():
            documented = registry.method(method_name).own_keys
            hosts = tuple(f"{p}." for p in state.layers)  # weight adapters inside the module are theirs
            added = [n for n in modapt.adapter_state_dict(model) if n.startswith(f"{path}.") and not n.startswith(hosts)]
            for name in added:
                key = name[len(path) + 1:]
                assert any(key == k or key.endswith("." + k) or key.startswith(k + ".") for k in documented), (
                    f"{name}: key {key!r} is not among the documented keys {documented}")
        file_names = set(modapt.adapter_state_dict(model))
        param_names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert param_names <= file_names, f"trainable parameters missing from the adapter file: {param_names - file_names}"

    def test_merge_equals_unmerged_forward(self, family, registry):
        model = self.adapted(family, registry)
        perturb(model)
        mergeable = all(m.capabilities.mergeable for m in self.methods(family, registry)
                        if m.family in ("update", "reparam"))
        inputs = tiny_inputs()
        base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        with torch.no_grad():
            expected = model_output(model, inputs)
            modapt.merge(model, unload=False)
            torch.testing.assert_close(model_output(model, inputs), expected, atol=self.merge_atol, rtol=1e-5)
            modapt.unmerge(model)
            for name, param in model.named_parameters():
                if name in base_weights:
                    assert torch.equal(param, base_weights[name]), f"unmerge did not restore {name} bit-exactly"
            torch.testing.assert_close(model_output(model, inputs), expected, atol=0, rtol=0)
            if not mergeable:
                return
            modapt.merge(model, unload=True)
            assert not any(isinstance(m, AdaptedLayer) for m in model.modules()), "merge(unload=True) left wrappers"
            torch.testing.assert_close(model_output(model, inputs), expected, atol=self.merge_atol, rtol=1e-5)

    def test_save_load_round_trip(self, family, registry, tmp_path):
        model = self.adapted(family, registry)
        perturb(model)
        modapt.save(model, tmp_path / "adapter", registry=registry)
        fresh = modapt.load(self.build(family), tmp_path / "adapter", registry=registry)
        saved, loaded = modapt.adapter_state_dict(model), modapt.adapter_state_dict(fresh)
        assert saved.keys() == loaded.keys()
        for name in saved:
            assert torch.equal(saved[name], loaded[name]), f"{name} differs after save/load"
        inputs = tiny_inputs()
        model.eval()
        fresh.eval()
        with torch.no_grad():
            torch.testing.assert_close(model_output(fresh, inputs), model_output(model, inputs), atol=0, rtol=0)

    def _two_named(self, family, registry, tmp_path):
        """Two single-adapter models of this recipe (different tensors), and one base holding
        both, loaded from their folders as "one" and "two". A model's first adapter trains its
        modules_to_save in place (it then holds the model alone), so for a recipe with
        modules_to_save the recipe without them is applied first as "anchor" and deleted once
        "one" and "two" (each with its modules_to_save copy) are loaded."""
        recipe = self.recipes[family]
        singles = {}
        for seed, name in enumerate(("one", "two"), start=1):
            singles[name] = self.adapted(family, registry).eval()
            perturb(singles[name], seed=seed)
            modapt.save(singles[name], tmp_path / name, registry=registry)
        both = self.build(family).eval()
        if isinstance(recipe, dict) and recipe.get("modules_to_save"):
            anchor = {k: v for k, v in recipe.items() if k != "modules_to_save"}
            modapt.apply(both, anchor, name="anchor", registry=registry)
        for name in singles:
            modapt.load(both, tmp_path / name, name=name, registry=registry)
        if "anchor" in modapt.adapters(both):
            modapt.delete(both, "anchor")
        return singles, both

    def test_two_named_adapters_switch_and_disable(self, family, registry, tmp_path):
        singles, both = self._two_named(family, registry, tmp_path)
        assert modapt.adapters(both) == ["one", "two"]
        inputs = tiny_inputs(batch=3)
        base = self.build(family).eval()
        with torch.no_grad():
            for name, single in singles.items():
                modapt.set_active(both, name)
                assert modapt.active(both) == [name]
                torch.testing.assert_close(model_output(both, inputs), model_output(single, inputs),
                                           atol=self.merge_atol, rtol=1e-5)
                assert sum(p.numel() for p in modapt.trainable_parameters(both).values()) == \
                    sum(p.numel() for p in modapt.trainable_parameters(single).values())
            with modapt.disabled(both):
                assert torch.equal(model_output(both, inputs), model_output(base, inputs)), "disabled is not the base"
            assert modapt.active(both) == ["two"]
            with modapt.rows(both, ["two", None, "one"]):
                mixed = model_output(both, inputs)
            for i, reference in enumerate((singles["two"], base, singles["one"])):
                torch.testing.assert_close(mixed[i], model_output(reference, inputs)[i], atol=self.merge_atol,
                                           rtol=1e-5)

    def test_save_one_of_two_named_adapters(self, family, registry, tmp_path):
        singles, both = self._two_named(family, registry, tmp_path)
        modapt.save(both, tmp_path / "saved", name="two", registry=registry)
        alone = modapt.load(self.build(family).eval(), tmp_path / "saved", registry=registry)
        assert modapt.adapters(alone) == ["two"]
        expected = modapt.adapter_state_dict(singles["two"])
        loaded = modapt.adapter_state_dict(alone)
        assert expected.keys() == loaded.keys(), "a saved named adapter must have single-adapter tensor names"
        assert all(torch.equal(expected[k], loaded[k]) for k in expected)
        modapt.delete(both, "one")
        assert modapt.adapters(both) == ["two"]

    def test_load_refuses_another_base(self, family, registry, tmp_path):
        model = self.adapted(family, registry)
        modapt.save(model, tmp_path / "adapter", registry=registry)
        other = self.build(family, seed=1)
        if not modapt.state_of(model).base_keys:
            pytest.skip("this recipe touches no base weight (no fingerprint to check)")
        before = copy.deepcopy(other.state_dict())
        with pytest.raises(modapt.AdapterLoadError, match="other values"):
            modapt.load(other, tmp_path / "adapter", registry=registry)
        assert not modapt.is_adapted(other)
        after = other.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def test_bfloat16_and_moves(self, family, registry):
        model = self.adapted(family, registry)
        perturb(model)
        inputs = tiny_inputs()
        with torch.no_grad():
            reference = model_output(model, inputs)
            model.to(torch.bfloat16)
            low = model_output(model, inputs)
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
        assert (low.float() - reference).abs().max() < 0.1 * (1 + reference.abs().max())
        model.to(torch.float32)
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            model.to(device)
            moved = {k: v.to(device) for k, v in inputs.items()}
            with torch.no_grad():
                out = model_output(model, moved)
            assert out.device.type == device
        # a bf16 base keeps float32 adapter parameters (PEFT's autocast_adapter_dtype)
        half = modapt.apply(self.build(family).to(torch.bfloat16), self.recipes[family], registry=registry)
        saved_modules = tuple(f"{p}." for p in modapt.state_of(half).modules_to_save)
        for name, param in modapt.trainable_parameters(half).items():
            if name.startswith(saved_modules):
                continue  # a module trained in full keeps the base dtype
            assert param.dtype == torch.float32, f"{name} is {param.dtype}"
        with torch.no_grad():
            assert torch.isfinite(model_output(half, inputs).float()).all()

    def test_eval_and_no_grad_are_deterministic(self, family, registry):
        model = self.adapted(family, registry)
        perturb(model)
        model.eval()
        inputs = tiny_inputs()
        with torch.no_grad():
            first, second = model_output(model, inputs), model_output(model, inputs)
        assert torch.equal(first, second), "eval() forward is not deterministic (dropout still active?)"
        assert not first.requires_grad

    @pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml"])
    def test_recipe_round_trips_through_a_file(self, family, registry, tmp_path, suffix):
        recipe = modapt.parse_recipe(self.recipes[family], registry)
        path = tmp_path / f"recipe{suffix}"
        modapt.write_recipe(recipe, path)
        assert modapt.parse_recipe(path, registry) == recipe

    # ------------------------------------------------------------------ quantized family
    @pytest.fixture(params=["bnb-nf4", "bnb-int8"])
    def quantized_base(self, request):
        from modapt.testing.quantized_models import available

        if "llama" not in self.recipes:
            pytest.skip("the quantized family runs the 'llama' recipe; this class has none")
        if request.param not in self.quantized_bases:
            pytest.skip(f"{request.param} is not among this class's quantized_bases")
        reason = available(request.param)
        if reason:
            pytest.skip(reason)
        return request.param

    def test_quantized_base_trains_saves_loads_and_merges(self, quantized_base, registry, tmp_path):
        """On a 4-bit / 8-bit base: adapter tensors floating and trainable, gradients finite on
        them and absent on the base, save -> load onto a freshly quantized base gives the same
        outputs, merge(unload=False) ≈ the adapted model (LLM.int8 also quantizes activations:
        2 % of max |output|) and unmerge restores it exactly."""
        from modapt.testing.quantized_models import quantized_tiny_llama

        model = modapt.apply(quantized_tiny_llama(quantized_base), self.recipes["llama"], registry=registry)
        perturb(model)
        trainable = modapt.trainable_parameters(model)
        assert trainable and all(p.is_floating_point() for p in trainable.values())
        inputs = tiny_inputs()
        model.train()
        model_output(model, inputs).float().pow(2).mean().backward()
        for name, param in model.named_parameters():
            if name in trainable:
                assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}: no finite gradient"
            else:
                assert param.grad is None, f"frozen parameter {name} got a gradient"
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            expected = model_output(model, inputs)
        modapt.save(model, tmp_path / "adapter", registry=registry)
        fresh = modapt.load(quantized_tiny_llama(quantized_base), tmp_path / "adapter", registry=registry)
        with torch.no_grad():
            torch.testing.assert_close(model_output(fresh, inputs), expected, atol=0, rtol=0)
        if not modapt.state_of(model).layers:
            return
        mergeable = all(m.capabilities.mergeable for m in self.methods("llama", registry)
                        if m.family in ("update", "reparam"))
        if not mergeable:
            return
        bound = (0.02 if quantized_base == "bnb-int8" else 1e-5) * float(expected.abs().max())
        with torch.no_grad():
            modapt.merge(model, unload=False)
            merged = model_output(model, inputs)
            assert (merged - expected).abs().max() <= bound + self.merge_atol
            modapt.unmerge(model)
            torch.testing.assert_close(model_output(model, inputs), expected, atol=0, rtol=0)


def check_named_beside_lora(other: dict, registry, tmp_path, build=None) -> None:
    """An attention/module adapter (recipe entry ``other``) and a LoRA as named adapters "lora"
    and "other" on one base, against a model holding each alone and the bare base (issue 36):
    ``set_active`` each equals its model (1e-5), both active equal one recipe holding both
    entries, ``disabled`` is the base bit for bit, ``rows(["lora", "other", None])`` equals the
    three models row by row, and ``save(name="other")`` loads alone onto a fresh base equal.
    A second adapter of the same entry on the same modules ("again", tensors under
    ``modapt_adapters.again``) cannot be active with "other" (refused), but mixes per row."""
    from .models import tiny_llama

    build = build or tiny_llama
    lora = {"method": "lora", "targets": ["q_proj", "v_proj", "up_proj"], "r": 4, "lora_alpha": 8.0}
    inputs = tiny_inputs(batch=3)
    singles, both = {}, modapt.apply(build().eval(), {"adapter": [lora, other]}, registry=registry)
    perturb(both, seed=3)
    for seed, (name, entry) in enumerate((("lora", lora), ("other", other), ("again", other)), start=1):
        singles[name] = modapt.apply(build().eval(), {"adapter": [entry]}, registry=registry)
        if name == "again":
            perturb(singles[name], seed=seed)
        else:
            with torch.no_grad():  # "lora" and "other" are the two parts of the two-entry model
                whole = modapt.adapter_state_dict(both)
                for key, param in modapt.adapter_state_dict(singles[name]).items():
                    param.copy_(whole[key])
        modapt.save(singles[name], tmp_path / name, registry=registry)
    base = build().eval()
    multi = build().eval()
    for name in singles:
        modapt.load(multi, tmp_path / name, name=name, registry=registry)
    assert any(".modapt_adapters.again." in k for k, _ in multi.named_parameters())
    with torch.no_grad():
        outs = {name: model_output(single, inputs) for name, single in singles.items()}
        for name in singles:
            modapt.set_active(multi, name)
            torch.testing.assert_close(model_output(multi, inputs), outs[name], atol=1e-5, rtol=0)
        modapt.set_active(multi, ["lora", "other"])
        torch.testing.assert_close(model_output(multi, inputs), model_output(both, inputs), atol=1e-5, rtol=0)
        with pytest.raises(modapt.StateError, match="both hold an attention/module adapter"):
            modapt.set_active(multi, ["other", "again"])
        assert modapt.active(multi) == ["lora", "other"]
        with modapt.disabled(multi):
            assert torch.equal(model_output(multi, inputs), model_output(base, inputs)), "disabled is not the base"
        for names in (["lora", "other", None], ["again", None, "other"]):
            with modapt.rows(multi, names):
                mixed = model_output(multi, inputs)
            for i, name in enumerate(names):
                expected = model_output(singles[name] if name else base, inputs)[i]
                torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=0)
    modapt.save(multi, tmp_path / "saved", name="again", registry=registry)
    alone = modapt.load(build().eval(), tmp_path / "saved", registry=registry)
    expected, loaded = modapt.adapter_state_dict(singles["again"]), modapt.adapter_state_dict(alone)
    assert expected.keys() == loaded.keys(), "a saved named adapter must have single-adapter tensor names"
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)
    with torch.no_grad():
        torch.testing.assert_close(model_output(alone, inputs), outs["again"], atol=1e-5, rtol=0)
    modapt.delete(multi, "other")  # the first attachment goes; "again" keeps its holder's names
    modapt.set_active(multi, "again")
    with torch.no_grad():
        torch.testing.assert_close(model_output(multi, inputs), outs["again"], atol=1e-5, rtol=0)
    modapt.remove(multi)
    assert multi.state_dict().keys() == base.state_dict().keys(), "remove left adapter tensors behind"
