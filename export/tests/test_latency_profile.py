"""The latency script's ``--profile``: ONNX Runtime's profile read back per op type and provider."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


def load_script():
    spec = importlib.util.spec_from_file_location("modapt_latency_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_accounts_for_every_node_of_the_optimised_graph(tmp_path):
    import onnx

    script = load_script()
    out = tmp_path / "figures.json"
    assert script.main(["--size", "tiny", "--variants", "base", "--shapes", "1x8", "--repeats", "1",
                        "--warmup", "0", "--device", "cpu", "--profile", "3", "--workdir", str(tmp_path),
                        "--json", str(out)]) == 0
    prof = json.loads(out.read_text())["meta"]["profiles"]["base 1x8"]
    optimised = onnx.load(str(tmp_path / "profile-base-1x8.onnx"), load_external_data=False).graph
    # every node of ORT's optimised graph runs once per run, and the profile saw each of them
    assert sum(prof["nodes_by_provider"].values()) == len(optimised.node) == prof["nodes_optimised"]
    assert prof["nodes_by_provider"] == {"CPU": len(optimised.node)}
    assert prof["memcpy_nodes"] == 0  # one provider: nothing to copy between
    ops = {node.op_type for node in optimised.node}
    assert set(prof["by_op"]) == ops
    times = [entry["us"] for entry in prof["by_op"].values()]
    assert times == sorted(times, reverse=True)
