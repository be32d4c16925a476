"""Labelled text for ``modapt train``: reading (CSV, JSONL, the embedded corpus, a saved HF
``datasets`` folder), a seeded split, and padded batches."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import embedded
from .errors import ModaptError

# a documented, fixed split: 76 / 12 / 12 gives ~9.7k training reviews of the embedded corpus
SPLIT = (0.76, 0.12, 0.12)


@dataclass
class Examples:
    """Texts with integer labels (``labels`` empty for causal-lm data) and the label names."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> Examples:
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices] if self.labels else [],
                        self.label_names)


def _open_text(path: Path) -> io.TextIOBase:
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", newline="")


def _rows(path: Path) -> list[dict]:
    name = path.name.removesuffix(".bz2").removesuffix(".gz")
    try:
        with _open_text(path) as f:
            if name.endswith(".csv"):
                return list(csv.DictReader(f))
            if name.endswith((".jsonl", ".json")):
                return [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ModaptError(f"--data: cannot read {path}: {exc}") from None
    raise ModaptError(f"--data: unknown data format '{path.name}'; accepted: .csv, .jsonl (optionally .gz/.bz2), "
                      f"a saved datasets folder, or '{embedded.ROTTEN_TOMATOES}'")


def read_examples(source: str, *, text_column: str = "text", label_column: str | None = "label",
                  task: str = "sequence-classification") -> Examples:
    """Read labelled (or, for causal-lm, plain) text from ``source``."""
    if source == embedded.ROTTEN_TOMATOES:
        rows = [r for r in _rows(embedded.rotten_tomatoes_csv()) if r["category"] != "plot"]
        return Examples([r["text"] for r in rows], [int(r["category"] == "fresh") for r in rows], ["rotten", "fresh"])
    path = Path(source)
    if path.is_dir():
        rows = _dataset_rows(path)
    elif path.is_file():
        rows = _rows(path)
    else:
        raise ModaptError(f"--data: no such file or directory: {source}")
    if not rows:
        raise ModaptError(f"--data: {source} holds no rows")
    _check_rows(rows, source)
    columns = list(rows[0])
    if text_column not in columns:
        raise ModaptError(f"--data: no column '{text_column}' in {source}; columns: {', '.join(columns)}")
    texts = [str(r[text_column]) for r in rows]
    if task == "causal-lm" or label_column is None:
        return Examples(texts, [], [])
    if label_column not in columns:
        raise ModaptError(f"--data: no label column '{label_column}' in {source}; columns: {', '.join(columns)} "
                          "(choose one with --label-column)")
    raw = [r[label_column] for r in rows]
    empty = next((i for i, v in enumerate(raw) if v is None or v == ""), None)
    if empty is not None:
        raise ModaptError(f"--data: row {empty + 1} of {source} has no value in label column '{label_column}'")
    names = sorted({str(v) for v in raw}, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    index = {n: i for i, n in enumerate(names)}
    return Examples(texts, [index[str(v)] for v in raw], names)


def _check_rows(rows: list, source: str) -> None:
    """Every row an object with the same fields: a JSON Lines file whose lines are not objects, a
    JSON array, or a CSV row with more or fewer values than the header is refused by row number."""
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ModaptError(f"--data: line {i} of {source} is a JSON {type(row).__name__}, not an object "
                              "(JSON Lines: one object such as {\"text\": ..., \"label\": ...} per line)")
        if None in row or any(v is None for v in row.values()):
            raise ModaptError(f"--data: row {i} of {source} has {'more' if None in row else 'fewer'} values than "
                              "the header has columns")


def _dataset_rows(path: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ModaptError(f"--data: {path} is a folder; reading a saved Hugging Face dataset needs the "
                          "'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ModaptError(f"--data: {path} is a folder but not a saved Hugging Face dataset "
                          f"(datasets.load_from_disk: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    return [dict(r) for r in ds]


def split(examples: Examples, seed: int, fractions=SPLIT) -> tuple[Examples, Examples, Examples]:
    """Train / validation / test by a seeded shuffle (the same seed gives the same split)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train = int(fractions[0] * len(order))
    n_val = int(fractions[1] * len(order))
    return (examples.subset(order[:n_train]), examples.subset(order[n_train:n_train + n_val]),
            examples.subset(order[n_train + n_val:]))


def batches(tokenizer, examples: Examples, batch_size: int, max_length: int, *, shuffle: bool = False,
            seed: int = 0, task: str = "sequence-classification") -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches: ``input_ids``/``attention_mask`` [batch, ≤ max_length] and ``labels``
    ([batch] class ids, or [batch, seq] token ids with −100 at padding for causal-lm)."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([examples.texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if task == "causal-lm":
            batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        else:
            batch["labels"] = torch.tensor([examples.labels[i] for i in idx])
        yield batch
