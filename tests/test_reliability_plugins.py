"""Broken plugins: reported with their distribution name, the others keep working, no silent replacement.

Extends core/tests/test_registry.py (import failure of an entry point, a raise in
``modapt_register_methods``, a raise in ``modapt_regularization_loss``, a method collision):
here the other hooks, the CLI with a broken plugin installed, preset and command collisions,
and a plugin whose ``build`` raises.
"""

from __future__ import annotations

import importlib.metadata
import json
import types

import modapt
import modapt.cli
import modapt.lora
import pytest
import torch
from modapt.registry import Registry, use_registry
from modapt.testing import tiny_llama

LORA = {"adapter": [{"method": "lora", "r": 2, "targets": ["q_proj"]}]}


def plugin(**functions):
    p = types.SimpleNamespace()
    for name, fn in functions.items():
        setattr(p, name, modapt.hookimpl(fn))
    return p


def boom(*args, **kwargs):
    raise RuntimeError("boom from the plugin")


def with_lora(*extra):
    reg = Registry(autoload=False)
    reg.register_plugin(modapt.lora, name="lora", distribution="modapt")
    for p, name, dist in extra:
        reg.register_plugin(p, name=name, distribution=dist)
    return reg


@pytest.mark.parametrize("hook, call", [
    ("modapt_before_optimizer_step", lambda m, r: modapt.before_optimizer_step(m, 0, registry=r)),
    ("modapt_after_optimizer_step", lambda m, r: modapt.after_optimizer_step(m, 0, registry=r)),
])
def test_raise_inside_a_step_hook_names_the_distribution(hook, call):
    reg = with_lora((plugin(**{hook: lambda model, step: boom()}), "bad", "dist-bad"))
    model = modapt.apply(tiny_llama(), LORA, registry=reg)
    with pytest.raises(modapt.PluginError, match=rf"plugin 'bad' \(dist-bad\) failed in {hook}: RuntimeError: boom"):
        call(model, reg)


def test_raise_inside_validate_recipe_names_the_distribution_and_a_refusal_keeps_the_key_path():
    reg = with_lora((plugin(modapt_validate_recipe=lambda recipe, registry: boom()), "bad", "dist-bad"))
    with pytest.raises(modapt.PluginError, match=r"'bad' \(dist-bad\) failed in modapt_validate_recipe"):
        modapt.parse_recipe(LORA, reg) if hasattr(modapt, "parse_recipe") else modapt.recipe.parse_recipe(LORA, reg)

    def refuse(recipe, registry):
        raise modapt.RecipeError("lora may not go on q_proj here", path="adapter[0].targets")

    reg = with_lora((plugin(modapt_validate_recipe=refuse), "rules", "dist-rules"))
    with pytest.raises(modapt.RecipeError, match=r"adapter\[0\].targets: lora may not"):
        modapt.recipe.parse_recipe(LORA, reg)


@pytest.mark.parametrize("hook", ["modapt_register_presets", "modapt_describe"])
def test_raise_in_a_later_registration_hook_rolls_back_the_plugins_methods(hook):
    dense = modapt.Method(name="dense", family="update", options=modapt.lora.LoraOptions, build=modapt.lora.Lora,
                          own_keys=("lora_A.weight", "lora_B.weight"), capabilities=modapt.Capabilities(mergeable=True))
    fns = {"modapt_register_methods": lambda register: register(dense),
           hook: (lambda register: boom()) if hook == "modapt_register_presets" else (lambda: boom())}
    reg = with_lora((plugin(**fns), "half", "dist-half"))
    assert reg.method("lora")  # the others keep working
    info = reg.plugins["half"]
    assert info.status == "broken" and info.distribution == "dist-half" and "boom" in info.error
    with pytest.raises(modapt.PluginError, match="unknown method 'dense'"):
        reg.method("dense")  # nothing half-registered stays behind


def test_preset_collision_is_refused_naming_both():
    a = plugin(modapt_register_presets=lambda register: register("mine", LORA, citation="a"))
    b = plugin(modapt_register_presets=lambda register: register("mine", {"adapter": []}, citation="b"))
    reg = with_lora((a, "a", "dist-a"), (b, "b", "dist-b"))
    assert reg.presets["mine"].recipe == LORA  # the first stays, the second cannot replace it
    assert reg.plugins["b"].status == "broken"
    assert "dist-a" in reg.plugins["b"].error and "dist-b" in reg.plugins["b"].error


def test_plugin_cannot_replace_a_core_method():
    fake = modapt.Method(name="lora", family="update", options=modapt.lora.LoraOptions,
                         build=lambda host, options: boom(), own_keys=("lora_A.weight", "lora_B.weight"),
                         capabilities=modapt.Capabilities(mergeable=True))
    reg = with_lora((plugin(modapt_register_methods=lambda register: register(fake)), "evil", "dist-evil"))
    with pytest.raises(modapt.PluginError, match="registered by both modapt and dist-evil"):
        reg.method("lora")


def test_build_raising_leaves_the_model_untouched():
    """A bug in a plugin's build (not a ValueError): a PluginError names the distribution, the model is restored."""
    bad = modapt.Method(name="bad", family="update", options=modapt.lora.LoraOptions,
                        build=lambda host, options: boom(), own_keys=("x",),
                        capabilities=modapt.Capabilities(mergeable=True))
    reg = with_lora((plugin(modapt_register_methods=lambda register: register(bad)), "bad", "dist-bad"))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = {"adapter": [{"method": "lora", "r": 2, "targets": ["q_proj"]}, {"method": "bad", "targets": ["v_proj"]}]}
    with pytest.raises(modapt.PluginError, match=r"\(dist-bad\) failed to build 'bad' on .*RuntimeError: boom"):
        modapt.apply(model, recipe, registry=reg)
    assert not modapt.is_adapted(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()


# ---------------------------------------------------------------------------- the CLI with broken plugins
class FakeEP:
    def __init__(self, name, dist, load):
        self.name, self.dist, self._load = name, types.SimpleNamespace(name=dist), load

    def load(self):
        return self._load()


def cli_registry(monkeypatch, *extra):
    """A registry that reads (fake) entry points: the real LoRA plus ``extra``."""
    eps = [FakeEP("lora", "modapt", lambda: modapt.lora), *extra]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps if group == "modapt" else [])
    return Registry()


def test_cli_lists_a_plugin_broken_at_import_and_the_others_work(monkeypatch, tmp_path, capsys):
    def fail():
        raise ImportError("No module named 'ghost_dep'")

    reg = cli_registry(monkeypatch, FakeEP("ghost", "modapt-ghost", fail))
    (tmp_path / "r.json").write_text(json.dumps(LORA))
    with use_registry(reg):
        assert modapt.cli.main(["plugins", "--json"]) == 0
        payload = json.loads(capsys.readouterr().out)
        ghost = next(p for p in payload["plugins"] if p["name"] == "ghost")
        assert ghost["status"] == "broken" and ghost["distribution"] == "modapt-ghost" and "ghost_dep" in ghost["error"]
        assert modapt.cli.main(["plugins"]) == 0
        assert "BROKEN: import failed: ImportError" in capsys.readouterr().out
        assert modapt.cli.main(["recipe", "check", str(tmp_path / "r.json")]) == 0


def _hello(parser):
    parser.set_defaults(run=lambda args: print("hello") or 0)


HELLO = plugin(modapt_register_commands=lambda register: register("hello", _hello, help="say hello"))


def test_cli_survives_a_plugin_raising_in_register_commands(monkeypatch, tmp_path, capsys):
    """One plugin's broken command must not take the whole CLI (and every other plugin) down."""
    bad = plugin(modapt_register_commands=lambda register: boom())
    reg = cli_registry(monkeypatch, FakeEP("badcmd", "modapt-badcmd", lambda: bad),
                       FakeEP("hello", "modapt-hello", lambda: HELLO))
    (tmp_path / "r.json").write_text(json.dumps(LORA))
    with use_registry(reg):
        code = modapt.cli.main(["hello"])
        out, err = capsys.readouterr()
        assert code == 0 and out == "hello\n", err
        assert "badcmd" in err and "modapt-badcmd" in err and "boom" in err and "Traceback" not in err
        # core commands never call the plugins' command hooks: nothing to warn about
        assert modapt.cli.main(["recipe", "check", str(tmp_path / "r.json")]) == 0
        assert capsys.readouterr().err == ""


def test_cli_command_cannot_be_taken_over(monkeypatch, tmp_path, capsys):
    """A plugin registering a core command (or another plugin's) is refused, and the CLI still runs."""
    def register_commands(register):
        register("recipe", lambda parser: parser.set_defaults(run=lambda args: boom()), help="hijack")

    thief = plugin(modapt_register_commands=register_commands)
    reg = cli_registry(monkeypatch, FakeEP("thief", "modapt-thief", lambda: thief),
                       FakeEP("hello", "modapt-hello", lambda: HELLO))
    (tmp_path / "r.json").write_text(json.dumps(LORA))
    with use_registry(reg):
        code = modapt.cli.main(["hello"])
        out, err = capsys.readouterr()
        assert code == 0 and out == "hello\n", err
        assert "modapt-thief" in err and "'recipe'" in err and "taken" in err
        code = modapt.cli.main(["recipe", "check", str(tmp_path / "r.json")])
        out, err = capsys.readouterr()
        assert code == 0 and "valid" in out, err
