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
