"""Loading plugins stays light, ``Lazy`` builds, ``PeftFormat`` and ``fast_paths``.

``modapt plugins`` and ``modapt recipe check`` read every installed plugin's methods; neither
may import torch or transformers (each costs about a second at start-up, README). The check
runs the CLI in a fresh process and reads its ``sys.modules`` afterwards.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import modapt
from modapt import fast_path_switches
from modapt.registry import Registry

HEAVY = ("torch", "transformers")

RECIPE = """
[[adapter]]
method = "map"
targets = ["q_proj"]
[adapter.update]
method = "lora"
r = 4

[[adapter]]
method = "dora"
targets = ["k_proj"]
[adapter.update]
method = "lora"
r = 4

[[adapter]]
method = "adalora"
init_r = 4
target_r = 2
total_step = 10
targets = ["o_proj"]

[[adapter]]
method = "lora"
targets = ["v_proj"]

[[adapter]]
method = "lmam"
"""


def heavy_modules_after(argv: list[str]) -> tuple[int, list[str]]:
    """(exit code, the heavy modules loaded) of ``modapt <argv>`` run in a fresh interpreter."""
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from modapt.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main({argv!r})
        print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rc, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return rc, heavy


def test_modapt_plugins_imports_neither_torch_nor_transformers():
    rc, heavy = heavy_modules_after(["plugins"])
    assert rc == 0 and heavy == []


def test_recipe_check_imports_neither_torch_nor_transformers(tmp_path):
    for dist in ("modapt_map", "modapt_dora", "modapt_adalora", "modapt_lmam"):
        if importlib.util.find_spec(dist) is None:
            pytest.skip(f"{dist} is not installed")
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    rc, heavy = heavy_modules_after(["recipe", "check", str(recipe)])
    assert rc == 0 and heavy == []


def test_every_registered_lazy_target_imports():
    """A misspelled ``Lazy`` target would fail only when a model is built: check them all here."""
    reg = Registry()
    reg.ensure_loaded()
    lazies = [(name, f) for name, m in reg.methods.items() for f in (m.build, m.default_targets)
              if isinstance(f, modapt.Lazy)]
    assert any(name == "lora" for name, _ in lazies)  # the core's own method is one
    for name, lazy in lazies:
        assert callable(lazy.resolve()), (name, lazy.target)


def test_lazy_refuses_a_target_without_attribute_and_calls_through():
    with pytest.raises(ValueError, match="package.module:attribute"):
        modapt.Lazy("modapt.lora_update")
    join = modapt.Lazy("os.path:join")
    assert join("a", "b") == __import__("os").path.join("a", "b")


def test_peft_format_is_frozen_and_checks_its_patterns():
    fmt = modapt.PeftFormat(peft_type="LORA", keys={"lora_A.weight": "lora_A.weight"},
                            embedding_keys={"lora_A.weight": "lora_embedding_A"},
                            options={"r": "r"}, patterns={"r": "rank_pattern"})
    assert fmt.file_keys("embedding") == {"lora_A.weight": "lora_embedding_A"}
    assert fmt.file_keys("linear") == {"lora_A.weight": "lora_A.weight"}
    assert fmt.prefix == "base_model.model."
    with pytest.raises(TypeError):
        fmt.keys["lora_B.weight"] = "lora_B.weight"  # the mappings are read-only too
    assert pickle.loads(pickle.dumps(fmt)) == fmt and copy.deepcopy(fmt) == fmt  # spawn, deepcopy
    with pytest.raises(ValueError, match="lora_alpha"):
        modapt.PeftFormat(peft_type="LORA", keys={}, options={"r": "r"}, patterns={"lora_alpha": "alpha_pattern"})


def test_registry_refuses_a_peft_declaration_that_is_not_a_peft_format():
    import modapt.lora

    bad = modapt.Method(name="dictpeft", family="update", options=modapt.lora.LoraOptions,
                        build=modapt.lora.LORA.build, own_keys=("lora_A.weight", "lora_B.weight"),
                        capabilities=modapt.Capabilities(mergeable=True), peft={"peft_type": "LORA"})
    plugin = type("P", (), {"modapt_register_methods": staticmethod(modapt.hookimpl(lambda register: register(bad)))})
    reg = Registry(autoload=False)
    reg.register_plugin(plugin, name="dictpeft")
    reg.ensure_loaded()
    assert reg.plugins["dictpeft"].status == "broken"
    assert "modapt.PeftFormat" in reg.plugins["dictpeft"].error


def test_fast_paths_switch_lora_to_the_module_path_and_restore_on_exit():
    """The one-node layer is one autograd node (``LoraLinear``); switched off, the output comes
    from the base call plus the adapter's terms: the same values, another graph."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6))
    modapt.apply(net, {"adapter": [{"method": "lora", "r": 2, "targets": ["0"]}]})
    with torch.no_grad():
        net[0].lora_B.weight.normal_()
    x = torch.randn(3, 8, requires_grad=True)
    fused = net(x)
    assert fast_path_switches.current.one_node
    with modapt.fast_paths(one_node=False) as inside:
        assert inside.one_node is False and inside.map_one_node is True  # the others unchanged
        with modapt.fast_paths(one_node=True):  # nests
            assert fast_path_switches.current.one_node
        assert not fast_path_switches.current.one_node
        general = net(x)
    assert fast_path_switches.current == fast_path_switches.FastPaths()  # back to the defaults
    assert type(fused.grad_fn).__name__ != type(general.grad_fn).__name__
    torch.testing.assert_close(fused, general)
    with pytest.raises(TypeError, match="one_node"), modapt.fast_paths(one_node=1):
        pass
    try:
        with modapt.fast_paths(map_one_node=False):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert fast_path_switches.current.map_one_node  # restored after an exception too
