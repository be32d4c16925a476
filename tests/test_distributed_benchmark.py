"""The 2-GPU benchmark's CPU path: 2 gloo processes, tiny LLaMA, both engines (numbers printed, never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_distributed_benchmark_smoke(tmp_path):
    pytest.importorskip("modapt_map")
    pytest.importorskip("modapt_lmam")
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "benchmarks" / "distributed_step.py"), "--size", "tiny", "--steps", "1", "--warmup", "0",
           "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert [r["engine"] for r in data["results"]] == ["ddp", "fsdp"]
    assert data["env"]["backend"] == "gloo"
    for row in data["results"]:
        assert row["world"] == 2 and len(row["peak_gib_per_rank"]) == 2
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["trainable"] > 0
    # same weights, same data: the two engines compute the same loss (bf16 rounding apart)
    assert abs(data["results"][0]["loss"] - data["results"][1]["loss"]) < 0.05
    assert "tokens/s" in proc.stdout
