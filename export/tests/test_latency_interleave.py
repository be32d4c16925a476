"""The latency script's ``--interleave``: the graphs timed in alternating rounds, paired ratios to the base."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("modapt_lmam")  # the script drops the lmam variant without it

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"
ARGS = ["--size", "tiny", "--variants", "base", "lmam", "--repeats", "3", "--warmup", "1", "--device", "cpu",
        "--reuse"]
ROW_KEYS = {"graph", "provider", "batch", "seq", "median_ms", "p90_ms", "min_ms"}


def load_script():
    spec = importlib.util.spec_from_file_location("modapt_latency_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Both tiny graphs exported once (the tests reuse them)."""
    path = tmp_path_factory.mktemp("latency")
    assert load_script().main(ARGS + ["--shapes", "1x4", "--repeats", "1", "--warmup", "0",
                                      "--workdir", str(path)]) == 0
    return path


def counting_runner(script, monkeypatch) -> list[str]:
    """Make every ONNX Runtime run append its variant to the returned list (and carry it as ``fn.variant``)."""
    calls: list[str] = []
    real = script.ort_runner

    def runner(ort, feeds):
        run = real(ort, feeds)
        variant = ort.path.parent.name.split("-")[1]  # export dir "tiny-<variant>-float32"

        def counted():
            calls.append(variant)
            run()

        counted.variant = variant
        return counted

    monkeypatch.setattr(script, "ort_runner", runner)
    return calls


def run(script, workdir, tmp_path, *extra) -> dict:
    out = tmp_path / "figures.json"
    assert script.main(ARGS + ["--workdir", str(workdir), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_interleave_rows_per_variant_and_shape_with_paired_ratios(workdir, tmp_path, monkeypatch):
    script = load_script()
    calls = counting_runner(script, monkeypatch)
    rows = run(script, workdir, tmp_path, "--shapes", "1x8", "2x4", "--interleave")["rows"]
    graphs = ["torch eager (base)", "ORT base", "ORT lmam"]
    assert [(r["graph"], r["batch"], r["seq"]) for r in rows] == [(g, *s) for s in [(1, 8), (2, 4)] for g in graphs]
    by_graph = {g: [r for r in rows if r["graph"] == g] for g in graphs}
    for r in by_graph["torch eager (base)"]:
        assert set(r) == ROW_KEYS  # eager timing as without --interleave
    for r in by_graph["ORT base"]:
        assert set(r) == ROW_KEYS | {"runs"} and r["runs"] == 3
    for r in by_graph["ORT lmam"]:
        assert set(r) == ROW_KEYS | {"runs", "ratio_to_base", "ratio_p10", "ratio_p90"} and r["runs"] == 3
        assert 0 < r["ratio_p10"] <= r["ratio_to_base"] <= r["ratio_p90"]
        assert r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    # per shape: one warm-up run of each graph, then three rounds of one run each, the first rotated
    per_shape = ["base", "lmam"] + ["base", "lmam"] + ["lmam", "base"] + ["base", "lmam"]
    assert calls == per_shape * 2


def test_interleave_ratio_is_the_median_of_same_round_pairs(workdir, tmp_path, monkeypatch):
    # base's rounds drift 10 → 20 → 30 ms; lmam's 30, 10, 20: the medians are equal (ratio of medians 1),
    # the per-round ratios 3, 0.5, 2/3 (paired median 2/3)
    script = load_script()
    counting_runner(script, monkeypatch)
    fake = {"base": [10.0, 20.0, 30.0], "lmam": [30.0, 10.0, 20.0]}
    timed_runs = {"base": 0, "lmam": 0}
    real_time_once = script.time_once

    def time_once(fn, device):
        variant = getattr(fn, "variant", None)
        if variant is None:  # torch eager: timed for real
            return real_time_once(fn, device)
        real_time_once(fn, device)
        timed_runs[variant] += 1
        return fake[variant][timed_runs[variant] - 1]

    monkeypatch.setattr(script, "time_once", time_once)
    rows = run(script, workdir, tmp_path, "--shapes", "1x8", "--interleave")["rows"]
    base, lmam = (next(r for r in rows if r["graph"] == g) for g in ("ORT base", "ORT lmam"))
    assert timed_runs == {"base": 3, "lmam": 3}
    assert base["median_ms"] == lmam["median_ms"] == 20.0
    assert base["min_ms"] == lmam["min_ms"] == 10.0
    ratios = [3.0, 0.5, 2 / 3]
    deciles = statistics.quantiles(ratios, n=10, method="inclusive")
    assert lmam["ratio_to_base"] == pytest.approx(2 / 3)
    assert lmam["ratio_p10"] == pytest.approx(deciles[0]) and lmam["ratio_p90"] == pytest.approx(deciles[-1])
    assert lmam["ratio_p10"] == pytest.approx(0.5 + 0.2 * (2 / 3 - 0.5))
    assert lmam["ratio_p90"] == pytest.approx(2 / 3 + 0.8 * (3 - 2 / 3))


def test_interleave_keeps_profile_and_plain_run_keeps_its_rows(workdir, tmp_path, monkeypatch, capsys):
    script = load_script()
    calls = counting_runner(script, monkeypatch)
    figures = run(script, workdir, tmp_path, "--shapes", "1x8", "--interleave", "--profile", "2")
    assert set(figures["meta"]["profiles"]) == {"base 1x8", "lmam 1x8"}
    for prof in figures["meta"]["profiles"].values():
        assert sum(prof["nodes_by_provider"].values()) == prof["nodes_optimised"] > 0
    # after the interleaved timing (2 warm-up + 6 timed runs), each profile runs its graph twice in the
    # session that saves the optimised graph, then RUNS = 2 times in the profiled one
    assert calls[:8] == ["base", "lmam", "base", "lmam", "lmam", "base", "base", "lmam"]
    assert calls[8:] == ["base"] * 4 + ["lmam"] * 4
    assert "| × base (paired) |" in capsys.readouterr().out

    calls.clear()
    rows = run(script, workdir, tmp_path, "--shapes", "1x8")["rows"]  # without --interleave: as before
    assert [r["graph"] for r in rows] == ["torch eager (base)", "ORT base", "ORT lmam"]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert calls == ["base"] * 4 + ["lmam"] * 4  # one graph after the other
    assert "paired" not in capsys.readouterr().out
