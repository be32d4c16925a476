"""The benchmark's CPU path runs (tiny size, a step or two); timings are printed, never asserted."""

import json

import pytest

from benchmarks.train_step import expand_methods, main, split_method


def test_benchmark_smoke(tmp_path):
    assert main(["--size", "tiny", "--methods", "peft-lora,lora,lomap,lora+lmam,lora@aot_eager", "--steps", "1",
                 "--warmup", "0", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    methods = [r["method"] for r in data["results"]]
    assert methods[:2] == ["peft-lora", "lora"]
    for r in data["results"]:
        assert r["step_ms"] > 0 and r["trainable"] > 0
    compiled = data["results"][-1]
    assert compiled["method"] == "lora@aot_eager"
    assert compiled["trainable"] == data["results"][1]["trainable"]
    assert compiled["compile_s"] > 0 and compiled["graphs"] == 1 and compiled["graph_breaks"] == 0
    assert compiled["infer_ms"] is None  # compiled rows time training only
    table = next(tmp_path.glob("*.md")).read_text()
    assert "| peft-lora |" in table and "| lora@aot_eager |" in table


def test_compile_rows_are_listed_beside_the_eager_ones():
    assert expand_methods("peft-lora,lora,lora@aot_eager", "none") == ["peft-lora", "lora", "lora@aot_eager"]
    assert expand_methods("peft-lora,lora", "reduce-overhead,default") == [
        "peft-lora", "peft-lora@reduce-overhead", "peft-lora@default", "lora", "lora@reduce-overhead", "lora@default"]
    assert split_method("full-ft@max-autotune-no-cudagraphs") == ("full-ft", "max-autotune-no-cudagraphs")
    with pytest.raises(ValueError, match="reduce-overhead"):
        split_method("lora@fast")


def test_profile_writes_each_methods_op_table(tmp_path):
    assert main(["--size", "tiny", "--methods", "lora", "--steps", "1", "--warmup", "0", "--profile", "2",
                 "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())["results"][0]
    assert result["profile"]["steps"] == 2 and result["profile"]["cpu_ms"] > 0
    rows = (tmp_path / "profile_lora.txt").read_text().splitlines()
    # LoRA's one-node layer: once per adapted linear (7 per layer, 2 layers) per profiled step
    forward = [row for row in rows if row.split() and row.split()[0] == "LoraLinear"]
    assert len(forward) == 1 and forward[0].split()[-1] == str(2 * 2 * 7)


def test_quantize_4bit_rows_share_one_quantized_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    assert main(["--size", "tiny", "--quantize", "4bit", "--methods", "peft-lora,lora,full-ft", "--steps", "1",
                 "--warmup", "0", "--out", str(tmp_path)]) == 0
    path = next(tmp_path.glob("*_4bit.json"))
    data = json.loads(path.read_text())
    assert data["meta"]["setup"]["quantize"] == "4bit"
    assert [r["method"] for r in data["results"]] == ["peft-lora", "lora"]  # no full fine-tuning of a 4-bit base
    assert data["results"][0]["trainable"] == data["results"][1]["trainable"]
