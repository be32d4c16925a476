"""The ``modapt`` command: exit codes, messages on stderr without tracebacks, plugin listing."""

import json
import subprocess
import sys

import pytest

BAD = '[[adapter]]\nmethod = "lorra"\nr = 8\ntargets = ["q_proj"]\n'
GOOD = '[[adapter]]\nmethod = "lora"\nr = 8\nlora_alpha = 16\ntargets = ["q_proj", "v_proj"]\n'


def modapt(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "modapt.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_version():
    result = modapt("--version")
    assert result.returncode == 0 and result.stdout.startswith("modapt ")


def test_plugins_json_lists_lora_with_capabilities():
    result = modapt("plugins", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    lora = next(p for p in payload["plugins"] if p["name"] == "lora")
    assert lora["distribution"] == "modapt" and lora["status"] == "ok"
    method = lora["methods"][0]
    assert method["name"] == "lora" and method["family"] == "update"
    assert method["capabilities"]["mergeable"] is True
    assert method["keys"] == ["lora_A.weight", "lora_B.weight"]
    assert "lora" in payload["families"]["update"]


def test_recipe_check_accepts_and_prints_resolved(tmp_path):
    (tmp_path / "r.toml").write_text(GOOD)
    result = modapt("recipe", "check", str(tmp_path / "r.toml"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["adapter"][0] == {
        "method": "lora", "targets": ["q_proj", "v_proj"], "r": 8, "lora_alpha": 16.0, "dropout": 0.0,
        "use_rslora": False}


def test_recipe_check_rejects_with_key_and_alternatives(tmp_path):
    (tmp_path / "r.toml").write_text(BAD)
    result = modapt("recipe", "check", str(tmp_path / "r.toml"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "adapter[0].method: unknown method 'lorra'" in result.stderr and "did you mean 'lora'" in result.stderr
    assert str(tmp_path / "r.toml") in result.stderr


@pytest.mark.parametrize("args", [["recipe"], ["recipe", "check"], ["--bogus"], ["nonsense"]])
def test_usage_errors_exit_2(args):
    result = modapt(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_missing_distribution_command_names_it():
    result = modapt("presets", env={"MODAPT_PLUGINS": "lora"})
    assert result.returncode == 1
    assert "pip install modapt-composers" in result.stderr and "Traceback" not in result.stderr
