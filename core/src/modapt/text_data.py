"""Labelled text for ``modapt train``: reading (CSV, JSONL, the embedded corpus, a saved HF
``datasets`` folder or ``DatasetDict``, a folder of train/validation/test files), the splits,
and padded batches.

Splits: data that comes split (a ``DatasetDict``, or a folder holding ``train.csv``,
``validation.csv``, ``test.csv``...) keeps its own splits; a single set is split by a seeded
shuffle (:data:`SPLIT`). :func:`load_splits` returns which of the two it did, in words.
"""

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
    """Read labelled (or, for causal-lm, plain) text from ``source`` as one set (the ``train``
    split of a ``DatasetDict``)."""
    if source == embedded.ROTTEN_TOMATOES:
        rows = [r for r in _rows(embedded.rotten_tomatoes_csv()) if r["category"] != "plot"]
        return Examples([r["text"] for r in rows], [int(r["category"] == "fresh") for r in rows], ["rotten", "fresh"])
    sets = _read_sets(source)
    return _to_examples({"train": sets.get("train", next(iter(sets.values())))}, source, text_column, label_column,
                        task)["train"]


# the names a split may have in a DatasetDict or as a file stem in a split folder
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
_SUFFIXES = (".csv", ".jsonl", ".json", ".csv.gz", ".jsonl.gz", ".csv.bz2", ".jsonl.bz2")


def _read_sets(source: str) -> dict[str, list[dict]]:
    """{split name: rows}: one entry ``{"all": rows}`` for a single file or dataset."""
    path = Path(source)
    if path.is_dir():
        files = {name: path / f"{stem}{suffix}" for name, stems in SPLIT_NAMES.items() for stem in stems
                 for suffix in _SUFFIXES if (path / f"{stem}{suffix}").is_file()}
        if "train" in files:
            return {name: _rows(f) for name, f in files.items()}
        sets = _dataset_rows(path)
    elif path.is_file():
        sets = {"all": _rows(path)}
    else:
        raise ModaptError(f"--data: no such file or directory: {source}")
    if not any(sets.values()):
        raise ModaptError(f"--data: {source} holds no rows")
    return sets


def _to_examples(sets: dict[str, list[dict]], source: str, text_column: str, label_column: str | None,
                 task: str) -> dict[str, Examples]:
    """Rows to :class:`Examples`, one label numbering shared by every split."""
    for rows in sets.values():
        _check_rows(rows, source)
    columns = list(next(rows for rows in sets.values() if rows)[0])
    for name, rows in sets.items():
        if rows and text_column not in rows[0]:
            raise ModaptError(f"--data: no column '{text_column}' in {source}; columns: {', '.join(columns)}")
    if task == "causal-lm" or label_column is None:
        return {name: Examples([str(r[text_column]) for r in rows], [], []) for name, rows in sets.items()}
    for name, rows in sets.items():
        if rows and label_column not in rows[0]:
            raise ModaptError(f"--data: no label column '{label_column}' in {source}; columns: "
                              f"{', '.join(rows[0])} (choose one with --label-column)")
        empty = next((i for i, r in enumerate(rows) if r[label_column] is None or r[label_column] == ""), None)
        if empty is not None:
            where = "" if name == "all" else f" ({name} split)"
            raise ModaptError(f"--data: row {empty + 1} of {source}{where} has no value in label column "
                              f"'{label_column}'")
    raw = {str(r[label_column]) for rows in sets.values() for r in rows}
    names = sorted(raw, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
    index = {n: i for i, n in enumerate(names)}
    return {name: Examples([str(r[text_column]) for r in rows], [index[str(r[label_column])] for r in rows], names)
            for name, rows in sets.items()}


def load_splits(source: str, seed: int, *, text_column: str = "text", label_column: str | None = "label",
                task: str = "sequence-classification") -> tuple[Examples, Examples, Examples, str]:
    """(train, validation, test, what was done in words).

    A ``DatasetDict`` or a split folder keeps its splits (a missing validation split is
    :data:`SPLIT`'s share of ``train``, seeded; a missing test split is empty); one set is split
    by :func:`split` with ``seed``.
    """
    if source == embedded.ROTTEN_TOMATOES:
        sets = {"all": None}
        examples = read_examples(source)
    else:
        sets = _read_sets(source)
        converted = _to_examples(sets, source, text_column, label_column, task)
        examples = converted.get("all")
    if "all" in sets or list(sets) == ["train"]:
        examples = examples if examples is not None else converted["train"]
        train, val, test = split(examples, seed)
        how = (f"one set of {len(examples)} rows, seeded split {'/'.join(f'{f:.0%}' for f in SPLIT)} "
               f"(seed {seed})")
        return train, val, test, how
    if "train" not in converted:
        raise ModaptError(f"--data: {source} has the splits {', '.join(converted)} but no 'train' split")
    train = converted["train"]
    kept = [name for name in ("train", "validation", "test") if name in converted]
    if "validation" in converted:
        val = converted["validation"]
        how = f"kept the data's own splits ({', '.join(kept)})"
    else:
        share = SPLIT[1] / (SPLIT[0] + SPLIT[1])
        train, val, _ = split(train, seed, (1 - share, share, 0.0))
        how = f"kept the data's own splits ({', '.join(kept)}); validation is {share:.0%} of train (seed {seed})"
    test = converted.get("test", Examples([], [], train.label_names))
    return train, val, test, how


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


def _dataset_rows(path: Path) -> dict[str, list[dict]]:
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
        aliases = {stem: name for name, stems in SPLIT_NAMES.items() for stem in stems}
        return {aliases.get(name, name): [dict(r) for r in split_] for name, split_ in ds.items()}
    return {"all": [dict(r) for r in ds]}


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
        yield collate(tokenizer, examples, order[start:start + batch_size], max_length, task=task)


def collate(tokenizer, examples: Examples, idx: list[int], max_length: int, *,
            task: str = "sequence-classification") -> dict[str, torch.Tensor]:
    """One padded batch of the examples at ``idx`` (shapes as in :func:`batches`)."""
    enc = tokenizer([examples.texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if task == "causal-lm":
        batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    else:
        batch["labels"] = torch.tensor([examples.labels[i] for i in idx])
    return batch
