"""MAP passes the conformance suite on tiny LLaMA, GPT-2 and BERT (Linear, Conv1D, Embedding).

Besides LoMAP with the default options, the suite runs MAP with the other init, the stepwise
schedule, over the test-only dense update (the materialising fallback), and over every other
update method installed in this environment (AdaLoMAP, FLoMAP, MAP over LoRMA… as those
distributions are installed).
"""

from __future__ import annotations

import importlib.metadata
import sys

import modapt_map.plugin
import pytest
from modapt.registry import Registry
from modapt.testing.conformance import MethodConformance

DENSE = sys.modules["modapt_map_tests_dense_update"]  # loaded by conftest.py


def lomap(targets, update=None, **options):
    return {"adapter": [{"method": "map", "targets": targets, **options,
                         "update": update or {"method": "lora", "r": 4, "lora_alpha": 16.0}}]}


class TestLomapConformance(MethodConformance):
    plugins = {"map": modapt_map.plugin}
    recipes = {
        "llama": lomap(["q_proj", "v_proj", "down_proj", "embed_tokens"]),
        "gpt2": lomap(["c_attn", "c_fc", "c_proj"]),  # wte is tied to lm_head: not mergeable
        "bert": {**lomap(["query", "value", "word_embeddings"]), "modules_to_save": ["classifier"]},
    }


class TestLomapPaperInitStepwiseConformance(MethodConformance):
    plugins = {"map": modapt_map.plugin}
    recipes = {"llama": lomap(["q_proj", "k_proj", "up_proj", "embed_tokens"],
                              update={"method": "lora", "r": 2, "dropout": 0.1},
                              init="paper", schedule="stepwise", period=3)}


class TestMapOverDenseConformance(MethodConformance):
    plugins = {"map": modapt_map.plugin, "dense": DENSE}
    recipes = {"gpt2": lomap(["c_fc", "c_proj"], update={"method": "dense"})}


# options an installed update requires (no default) and a small test recipe can give
REQUIRED_OPTIONS = {"adalora": {"total_step": 10}}


def _installed_updates() -> dict[str, tuple[str, object]]:
    """Update methods of other installed distributions: method name -> (plugin name, plugin module)."""
    found = {}
    for ep in importlib.metadata.entry_points(group="modapt"):
        if ep.name in ("map", "lora"):
            continue
        try:
            plugin = ep.load()
        except Exception:  # a broken plugin is its own distribution's failure, reported by its tests
            continue
        probe = Registry(autoload=False)
        probe.register_plugin(plugin, name=ep.name)
        for name, method in probe.methods.items():
            if method.family == "update" and method.plugin == ep.name:
                found[name] = (ep.name, plugin)
    return found


def _over(update: str, plugin_name: str, plugin) -> type:
    table = {"method": update, **REQUIRED_OPTIONS.get(update, {})}
    recipes = {
        "llama": lomap(["q_proj", "v_proj"], update=table),
        "gpt2": lomap(["c_attn", "c_proj"], update=table),
        "bert": lomap(["query", "value"], update=table),
    }
    # slow (make test-all): the other distributions' own suites cover them; this is the cross product
    return pytest.mark.slow(type(f"TestMapOver_{update}_Conformance", (MethodConformance,),
                                 {"plugins": {"map": modapt_map.plugin, plugin_name: plugin}, "recipes": recipes,
                                  "__doc__": f"MAP over the installed update '{update}'."}))


for _update, (_plugin_name, _plugin) in sorted(_installed_updates().items()):
    globals()[f"TestMapOver_{_update}_Conformance"] = _over(_update, _plugin_name, _plugin)
