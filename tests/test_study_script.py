"""examples/study/run.py end to end on a tiny model: cells in parallel child processes, resume, report."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

from modapt.testing.models import tiny_model_dir

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "study" / "run.py"


def write_reviews(path: Path, rows: int = 120) -> None:
    """Rotten-Tomatoes-shaped CSV (category fresh/rotten/plot, text) in the tiny tokenizer's words."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text"])
        for i in range(rows):
            kind = ["fresh", "rotten", "plot"][i % 3]
            words = {"fresh": ["good", "great", "fun"], "rotten": ["bad", "awful", "dull"], "plot": ["plot"]}[kind]
            writer.writerow([kind, " ".join(rng.choices(words, k=3) + rng.choices(["movie", "film", "actor"], k=3))])


def test_parallel_cells_resume_and_report(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model_dir(model_dir)
    data = tmp_path / "reviews.csv"
    write_reviews(data)
    out = tmp_path / "study"
    common = [sys.executable, str(SCRIPT), "--model-dir", str(model_dir), "--csv", str(data), "--out", str(out),
              "--limit", "40", "--lr", "1e-3"]
    run = subprocess.run([*common, "--runs", "head:0,lora:2", "--seeds", "0", "--parallel", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["r"], r["seed"]) for r in rows) == [("head", 0, 0), ("lora", 2, 0)]
    assert all(r["concurrent"] == 2 and 0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert {r["trainable"] for r in rows if r["method"] == "head"} != {r["trainable"] for r in rows if r["method"] == "lora"}
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["head-r0-s0.log", "lora-r2-s0.log"]

    # a second call finds every cell done and runs nothing
    again = subprocess.run([*common, "--runs", "head:0,lora:2", "--seeds", "0"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2

    report = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out / "runs.jsonl")],
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "| lora | 2 | 1 |" in report.stdout and "| head | 0 | 1 |" in report.stdout


def test_lr_sweep_tunes_on_validation_then_runs_seeds_and_resumes(tmp_path):
    """--sweep: seed 0 at each lr, the lr of the best validation accuracy per cell, then the other seeds there."""
    model_dir = tmp_path / "model"
    tiny_model_dir(model_dir)
    data = tmp_path / "reviews.csv"
    write_reviews(data)
    out = tmp_path / "study"
    cmd = [sys.executable, str(SCRIPT), "--model-dir", str(model_dir), "--csv", str(data), "--out", str(out),
           "--limit", "40", "--epochs", "3", "--sweep", "--runs", "head:0,lora:2", "--lrs", "1e-3,3e-3",
           "--seeds", "0,1", "--parallel", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    tuned = {(r["method"], r["lr"]): r for r in rows if r["seed"] == 0}
    assert sorted(tuned) == [("head", 1e-3), ("head", 3e-3), ("lora", 1e-3), ("lora", 3e-3)]
    for row in rows:  # 3 epochs (40 examples, batch 32: one step each), the epoch chosen on validation
        assert len(row["val_by_epoch"]) == 3 and row["val_accuracy"] == max(row["val_by_epoch"])
        assert row["test_accuracy"] == row["test_by_epoch"][row["val_by_epoch"].index(row["val_accuracy"])]
    for method in ("head", "lora"):
        # the chosen lr: the best seed-0 validation accuracy (ties to the smaller lr), written out
        want = max((1e-3, 3e-3), key=lambda lr: (tuned[(method, lr)]["val_accuracy"], -lr))
        seed1 = [r for r in rows if r["method"] == method and r["seed"] == 1]
        assert [r["lr"] for r in seed1] == [want]
        assert f"| {method} | {0 if method == 'head' else 2} | {want:g} | 2 |" in run.stdout
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep.md").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # all done: nothing runs
    assert again.returncode == 0, again.stderr
    assert "started" not in again.stdout
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 6
