"""The streaming merge of a checkpoint several times larger than one shard keeps its peak RSS
increase under 1.5x the largest shard plus the adapter (measured by the benchmark script in
fresh interpreters: the checkpoint is built in one, merged in another)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_memory.py"


def test_peak_rss_stays_below_one_and_a_half_shards(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak RSS")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "mm"), "--hidden", "256",
                           "--layers", "16", "--shard", "10MB"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip(f"cannot reset the peak RSS here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["shards"] >= 4
    assert figures["checkpoint_bytes"] >= 4 * figures["largest_shard_bytes"]
    assert figures["peak_increase_bytes"] < 1.5 * figures["largest_shard_bytes"] + figures["adapter_bytes"]
