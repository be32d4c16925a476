"""Reading files that may come from anyone: JSON and safetensors headers under size and depth limits.

An adapter folder or a checkpoint shard may be downloaded; its JSON can be nested 100 000 deep
(Python's parser then raises ``RecursionError``) or be gigabytes long, and a safetensors header
can claim shapes that are negative, strings, or larger than the file. Every reader here turns
such input into a one-line :class:`UntrustedFileError` naming the file, before anything else
reads it.

safetensors layout: ``[u64 little-endian n][n bytes of JSON header][data]``; the header maps
each tensor name to ``{"dtype", "shape": [int >= 0], "data_offsets": [begin, end]}`` (offsets
relative to the data section) plus an optional ``__metadata__`` of strings.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .errors import ModaptError

MAX_JSON_BYTES = 64 << 20  # an adapter config with per-tensor fingerprints of a 70B model is ~1 MB
MAX_JSON_DEPTH = 64  # the deepest config modapt or PEFT writes is < 10
MAX_HEADER_BYTES = 100 << 20  # safetensors' own reader refuses headers over 100 MB


class UntrustedFileError(ModaptError, ValueError):
    """A file that is too large, too deeply nested, or inconsistent to be read safely."""


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, iteratively (no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
    return deepest


def _bracket_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` outside strings: checked before ``json.loads`` recurses."""
    deepest = level = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            level += 1
            deepest = max(deepest, level)
        elif ch in "]}":
            level -= 1
    return deepest


def parse_json(text: str | bytes, source: str, *, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON ``text`` (from ``source``, named in errors) with size and nesting limits."""
    if len(text) > max_bytes:
        raise UntrustedFileError(f"{source}: {len(text)} bytes of JSON, more than the {max_bytes} read")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UntrustedFileError(f"{source}: not valid JSON (not UTF-8 text: {exc})") from None
    if _bracket_depth(text) > max_depth:
        raise UntrustedFileError(f"{source}: JSON nested deeper than {max_depth} levels")
    try:
        value = json.loads(text)
    except RecursionError:  # belt and braces: the scan above should have caught it
        raise UntrustedFileError(f"{source}: JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise UntrustedFileError(f"{source}: not valid JSON: {exc}") from None
    if _depth(value) > max_depth:
        raise UntrustedFileError(f"{source}: JSON nested deeper than {max_depth} levels")
    return value


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value in the file ``path``, its size checked before it is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UntrustedFileError(f"{path}: {size} bytes, more than the {max_bytes} read for a JSON file")
        data = path.read_bytes()
    except OSError as exc:
        raise UntrustedFileError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return parse_json(data, str(path), max_bytes=max_bytes, max_depth=max_depth)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """(``{name: {"dtype", "shape", "data_offsets"}}``, metadata, expected file size) of a safetensors file.

    Checks every entry (dtype a string, shape a list of ints >= 0, offsets inside the data and
    consistent with nothing else) and that the file holds exactly header + data, so a truncated
    or padded file is refused before its data is hashed or mapped.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UntrustedFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise UntrustedFileError(f"{path}: safetensors header length {n} does not fit the file ({size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise UntrustedFileError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    header = parse_json(raw, f"{path} (safetensors header)", max_bytes=MAX_HEADER_BYTES, max_depth=4)
    if not isinstance(header, dict):
        raise UntrustedFileError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UntrustedFileError(f"{path}: safetensors __metadata__ must map names to strings")
    data_end = 0
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise UntrustedFileError(f"{path}: tensor '{name}' has no header entry object")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(entry.get("dtype"), str):
            raise UntrustedFileError(f"{path}: tensor '{name}' has dtype {entry.get('dtype')!r}, not a name")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise UntrustedFileError(f"{path}: tensor '{name}' has shape {shape!r}, not a list of integers >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise UntrustedFileError(f"{path}: tensor '{name}' has data_offsets {offsets!r}")
        data_end = max(data_end, offsets[1])
    expected = 8 + n + data_end
    if expected != size:
        raise UntrustedFileError(f"{path}: the safetensors header describes {expected} bytes, the file has {size} "
                                 "(truncated or padded)")
    return header, metadata, expected
