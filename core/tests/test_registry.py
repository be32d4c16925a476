"""The registry: explicit and entry-point plugins, broken plugins, collisions, misspelled hooks."""

import importlib.metadata
import types

import pytest

import modapt
import modapt.lora
from modapt.registry import Registry


def make_plugin(**functions):
    """A plugin object whose attributes are hook implementations."""
    plugin = types.SimpleNamespace()
    for name, fn in functions.items():
        setattr(plugin, name, modapt.hookimpl(fn))
    return plugin


def dense_method(name="dense"):
    return modapt.Method(name=name, family="update", options=modapt.lora.LoraOptions, build=modapt.lora.Lora,
                         own_keys=("lora_A.weight", "lora_B.weight"),
                         capabilities=modapt.Capabilities(mergeable=True))


def test_explicit_registration_and_lookup():
    reg = Registry(autoload=False)
    reg.register_plugin(modapt.lora, name="lora", distribution="modapt")
    assert reg.method("lora").family == "update"
    assert reg.method("lora").distribution == "modapt"
    assert reg.method("additive").family == "reparam"  # the core's own, always present
    with pytest.raises(modapt.PluginError, match="did you mean 'lora'"):
        reg.method("lorra")


def test_collision_names_both_distributions():
    reg = Registry(autoload=False)
    reg.register_plugin(make_plugin(modapt_register_methods=lambda register: register(dense_method())),
                        name="one", distribution="dist-one")
    reg.register_plugin(make_plugin(modapt_register_methods=lambda register: register(dense_method())),
                        name="two", distribution="dist-two")
    with pytest.raises(modapt.PluginError) as info:
        reg.method("dense")
    assert "dist-one" in str(info.value) and "dist-two" in str(info.value)


def test_misspelled_hook_is_an_error_not_silence():
    reg = Registry(autoload=False)
    reg.register_plugin(make_plugin(modapt_register_method=lambda register: None), name="typo", distribution="typo")
    reg.ensure_loaded()
    info = reg.plugins["typo"]
    assert info.status == "broken"
    assert "modapt_register_method" in info.error and "did you mean 'modapt_register_methods'" in info.error


def test_plugin_raising_at_registration_is_reported_others_keep_working():
    def boom(register):
        raise RuntimeError("boom")

    reg = Registry(autoload=False)
    reg.register_plugin(make_plugin(modapt_register_methods=boom), name="bad", distribution="dist-bad")
    reg.register_plugin(modapt.lora, name="lora", distribution="modapt")
    assert reg.method("lora")
    assert reg.plugins["bad"].status == "broken"
    assert "boom" in reg.plugins["bad"].error and reg.plugins["bad"].distribution == "dist-bad"


def test_plugin_raising_inside_a_hook_names_its_distribution():
    def loss(model):
        raise ValueError("bad term")

    reg = Registry(autoload=False)
    reg.register_plugin(make_plugin(modapt_regularization_loss=loss), name="reg", distribution="dist-reg")
    with pytest.raises(modapt.PluginError, match=r"'reg' \(dist-reg\) failed in modapt_regularization_loss"):
        modapt.regularization_loss(modapt.testing.tiny_llama(), registry=reg)


def test_entry_points_and_modapt_plugins_env(monkeypatch):
    eps = importlib.metadata.entry_points(group="modapt")
    assert "lora" in eps.names  # the core registers LoRA through its own entry point
    monkeypatch.setenv("MODAPT_PLUGINS", "lora")
    reg = Registry()
    assert set(reg.plugins) == set()  # lazy: nothing loaded until first use
    reg.ensure_loaded()
    assert set(reg.plugins) == {"lora", "modapt-core"}
    monkeypatch.setenv("MODAPT_PLUGINS", "nothing")
    reg = Registry()
    with pytest.raises(modapt.PluginError, match="unknown method 'lora'"):
        reg.method("lora")


def test_broken_entry_point_is_reported(monkeypatch):
    class BrokenEP:
        name = "ghost"
        dist = types.SimpleNamespace(name="modapt-ghost")

        def load(self):
            raise ImportError("No module named 'ghost_dep'")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [BrokenEP()] if group == "modapt" else [])
    reg = Registry()
    reg.ensure_loaded()
    assert reg.plugins["ghost"].status == "broken"
    assert "ghost_dep" in reg.plugins["ghost"].error and reg.plugins["ghost"].distribution == "modapt-ghost"


def test_every_hook_is_documented():
    """Each hookspec has a docstring saying what it receives and returns, and appears in docs/hooks.md."""
    from pathlib import Path

    from modapt import hookspecs

    docs = (Path(__file__).resolve().parents[2] / "docs" / "hooks.md").read_text()
    hooks = [n for n in dir(hookspecs) if n.startswith("modapt_")]
    assert len(hooks) >= 9
    for name in hooks:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert len(doc) > 80 and (":return:" in doc), f"{name} is not documented"
        assert f"`{name}" in docs, f"{name} is missing from docs/hooks.md"
