"""The base fingerprint: which base weights an adapter was trained on (docs/architecture.md: a fixed name).

sha256 over the touched base tensors sorted by their ``transformers`` state-dict key, feeding
for each: the key, the dtype name, the shape, and the raw bytes as stored. The same function
runs on a live model and on safetensors shards, so a streaming merge checks it without
loading the model. Per-tensor digests are kept beside it so that a mismatch can name the
first tensor that differs.

A quantized base layer (:mod:`modapt.quantized`) is fingerprinted over what it stores: ``get``
returns a :class:`QuantizedStored` for its weight key, and the record feeds the key, the
kind name, then each stored tensor (packed weight and quantization state, sorted by name) as
(name, dtype, shape, bytes). Its recorded dtype is ``quantized:<kind>``, so an adapter trained
on a float base is told apart from one trained on a quantized base (``verify_base=False`` moves
it across, knowingly).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

FINGERPRINT_ALGORITHM = "sha256(key, dtype, shape, bytes) over touched base tensors sorted by key"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


QUANTIZED_PREFIX = "quantized:"


@dataclass(frozen=True)
class QuantizedStored:
    """What a quantized layer stores for one weight: its kind and {name: tensor} (packed weight
    and quantization state, names relative to the layer: ``weight``, ``weight.absmax``, ``SCB``)."""

    kind: str
    tensors: Mapping[str, torch.Tensor]
    shape: tuple[int, int]  # W0's logical [out, in]


def _bytes(tensor: torch.Tensor) -> bytes:
    plain = tensor.detach()
    if type(plain) is not torch.Tensor:  # bitsandbytes' Params4bit/Int8Params: read the storage as is
        plain = plain.as_subclass(torch.Tensor)
    return plain.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _feed(hashers, key: str, tensor) -> None:
    if isinstance(tensor, QuantizedStored):
        parts = [f"{key}\0{QUANTIZED_PREFIX}{tensor.kind}\0{tuple(tensor.shape)}\0".encode()]
        for name in sorted(tensor.tensors):
            t = tensor.tensors[name]
            parts.append(f"{name}\0{_dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
            parts.append(_bytes(t))
    else:
        header = f"{key}\0{_dtype_name(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode()
        parts = [header, _bytes(tensor)]
    for h in hashers:
        for part in parts:
            h.update(part)


def _record_dtype(tensor) -> str:
    if isinstance(tensor, QuantizedStored):
        return QUANTIZED_PREFIX + tensor.kind
    return _dtype_name(tensor.dtype)


def fingerprint(keys: Iterable[str], get: Callable[[str], torch.Tensor]) -> tuple[str, dict[str, dict]]:
    """(combined hex digest, {key: {"dtype", "shape", "sha256"}}) over ``keys``.

    ``get(key)`` returns the tensor as stored (a live parameter, or a tensor read from a
    safetensors shard), or a :class:`QuantizedStored` for a quantized layer's weight; tensors
    are fetched one at a time, so shards can be streamed.
    """
    total = hashlib.sha256()
    per: dict[str, dict] = {}
    for key in sorted(keys):
        tensor = get(key)
        single = hashlib.sha256()
        _feed((total, single), key, tensor)
        per[key] = {"dtype": _record_dtype(tensor), "shape": list(tensor.shape), "sha256": single.hexdigest()}
    return total.hexdigest(), per


def first_mismatch(expected: Mapping[str, dict], actual: Mapping[str, dict]) -> str | None:
    """A sentence naming the first tensor (by key) whose dtype, shape or bytes differ, or ``None``."""
    for key in sorted(expected):
        want, got = expected[key], actual.get(key)
        if got is None:
            return f"base tensor '{key}' is missing"
        problem = _quantized_mismatch(key, want["dtype"], got["dtype"])
        if problem:
            return problem
        if want["shape"] != got["shape"]:
            return f"base tensor '{key}' has shape {got['shape']}, the adapter was trained on {want['shape']}"
        if want["dtype"] != got["dtype"]:
            return f"base tensor '{key}' has dtype {got['dtype']}, the adapter was trained on {want['dtype']}"
        if want["sha256"] != got["sha256"]:
            return f"base tensor '{key}' has other values than the weights the adapter was trained on"
    return None


def _quantized_mismatch(key: str, want: str, got: str) -> str | None:
    """The sentence for a float base vs a quantized one (or two quantizations), or ``None``."""
    if want == got or not (want.startswith(QUANTIZED_PREFIX) or got.startswith(QUANTIZED_PREFIX)):
        return None

    def describe(dtype: str) -> str:
        return f"quantized ({dtype.removeprefix(QUANTIZED_PREFIX)})" if dtype.startswith(QUANTIZED_PREFIX) \
            else f"not quantized ({dtype})"

    return (f"base tensor '{key}' is {describe(got)}, the adapter was trained on a base where it is "
            f"{describe(want)}; the adapter fits both, with outputs that differ by the quantization error: "
            "pass verify_base=False (--no-verify-base) to use it on this base")
