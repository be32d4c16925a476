"""The base fingerprint: which base weights an adapter was trained on (DESIGN.md, fixed).

sha256 over the touched base tensors sorted by their ``transformers`` state-dict key, feeding
for each: the key, the dtype name, the shape, and the raw bytes as stored. The same function
runs on a live model and on safetensors shards, so a streaming merge checks it without
loading the model. Per-tensor digests are kept beside it so that a mismatch can name the
first tensor that differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

import torch

FINGERPRINT_ALGORITHM = "sha256(key, dtype, shape, bytes) over touched base tensors sorted by key"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _feed(hashers, key: str, tensor: torch.Tensor) -> None:
    header = f"{key}\0{_dtype_name(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode()
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    for h in hashers:
        h.update(header)
        h.update(data)


def fingerprint(keys: Iterable[str], get: Callable[[str], torch.Tensor]) -> tuple[str, dict[str, dict]]:
    """(combined hex digest, {key: {"dtype", "shape", "sha256"}}) over ``keys``.

    ``get(key)`` returns the tensor as stored (a live parameter, or a tensor read from a
    safetensors shard); tensors are fetched one at a time, so shards can be streamed.
    """
    total = hashlib.sha256()
    per: dict[str, dict] = {}
    for key in sorted(keys):
        tensor = get(key)
        single = hashlib.sha256()
        _feed((total, single), key, tensor)
        per[key] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape), "sha256": single.hexdigest()}
    return total.hexdigest(), per


def first_mismatch(expected: Mapping[str, dict], actual: Mapping[str, dict]) -> str | None:
    """A sentence naming the first tensor (by key) whose dtype, shape or bytes differ, or ``None``."""
    for key in sorted(expected):
        want, got = expected[key], actual.get(key)
        if got is None:
            return f"base tensor '{key}' is missing"
        if want["shape"] != got["shape"]:
            return f"base tensor '{key}' has shape {got['shape']}, the adapter was trained on {want['shape']}"
        if want["dtype"] != got["dtype"]:
            return f"base tensor '{key}' has dtype {got['dtype']}, the adapter was trained on {want['dtype']}"
        if want["sha256"] != got["sha256"]:
            return f"base tensor '{key}' has other values than the weights the adapter was trained on"
    return None
