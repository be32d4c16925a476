"""``modapt presets [--json]``, called in-process."""

from __future__ import annotations

import json

import modapt.cli
from modapt_composers.presets import PRESETS


def test_presets_json_lists_every_preset_with_its_citation(registry, capsys):
    assert modapt.cli.main(["presets", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["presets"]}
    assert set(listed) == {p.name for p in PRESETS}
    for spec in PRESETS:
        entry = listed[spec.name]
        assert entry["citation"] == spec.citation and "Table" in entry["citation"]
        assert entry["distribution"] == "modapt-composers"
        assert entry["methods"] and entry["notes"] == spec.notes, spec.name
    assert [m["name"] for m in listed["lomap"]["methods"]] == ["map", "lora"]
    assert [m["name"] for m in listed["lora+adapter-ffn+lmam"]["methods"]] == ["lora", "bottleneck", "lmam"]


def test_presets_say_which_methods_are_missing(modapt_registry, capsys):
    import modapt_composers.plugin

    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    modapt_registry.register_plugin(modapt_composers.plugin, "composers", "modapt-composers")
    assert modapt.cli.main(["presets", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["presets"]}
    lomap = listed["lomap"]
    assert lomap["ready"] is False
    assert {"name": "map", "installed": False, "distribution": "modapt-map"} in lomap["methods"]
    assert {"name": "lora", "installed": True, "distribution": "modapt"} in lomap["methods"]
    assert modapt.cli.main(["presets"]) == 0
    text = capsys.readouterr().out
    assert "needs map (pip install modapt-map)" in text and "lorma-pi" in text


def test_a_refused_recipe_is_exit_code_1_without_traceback(registry, tmp_path, capsys, helpers):
    helpers.need(registry, "lorma")
    path = tmp_path / "two.toml"
    path.write_text('[[adapter]]\nmethod = "lora"\ntargets = ["q_proj"]\n'
                    '[[adapter]]\nmethod = "lorma"\ntargets = ["q_proj"]\n')
    assert modapt.cli.main(["recipe", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"modapt: error: {path}: adapter[1].targets: rule 'two updates on one weight")
    assert "Traceback" not in err
