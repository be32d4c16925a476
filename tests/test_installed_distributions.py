"""The one integration test over really installed distributions (entry points, not fixtures).

Every distribution folder of the repository that `make test` installed must show up in
`modapt plugins --json` as a working plugin, with the methods it declares.
"""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def declared_entry_points():
    found = {}
    for pyproject in sorted(ROOT.glob("*/pyproject.toml")) + sorted(ROOT.glob("*/*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        for name in data.get("project", {}).get("entry-points", {}).get("modapt", {}):
            found[name] = data["project"]["name"]
    return found


def test_every_distribution_is_a_working_plugin():
    result = subprocess.run([sys.executable, "-m", "modapt.cli", "plugins", "--json"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    declared = declared_entry_points()
    assert {"lora", "ia3"} <= set(declared)
    for name, dist in declared.items():
        assert name in plugins, f"{dist} is not installed as a modapt plugin"
        assert plugins[name]["status"] == "ok", f"{name}: {plugins[name]['error']}"
        assert plugins[name]["distribution"] == dist
    assert any(m["name"] == "ia3" for m in plugins["ia3"]["methods"])
