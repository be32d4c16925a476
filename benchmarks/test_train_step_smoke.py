"""The benchmark's CPU path runs (tiny size, a step or two); timings are printed, never asserted."""

import json

from benchmarks.train_step import main


def test_benchmark_smoke(tmp_path):
    assert main(["--size", "tiny", "--methods", "peft-lora,lora,lomap,lora+lmam", "--steps", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    methods = [r["method"] for r in data["results"]]
    assert methods[:2] == ["peft-lora", "lora"]
    for r in data["results"]:
        assert r["step_ms"] > 0 and r["trainable"] > 0
    assert "| peft-lora |" in next(tmp_path.glob("*.md")).read_text()
