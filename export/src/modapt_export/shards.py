"""Reading and writing safetensors checkpoints one shard, one tensor at a time.

A checkpoint folder holds ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. A safetensors file is an 8-byte little-endian header
length N, N bytes of JSON ``{key: {"dtype", "shape", "data_offsets": [begin, end]}}``
(offsets relative to the end of the header), then the raw data. The streaming merge writes
each output shard as a copy of its input shard in which the byte ranges of the merged
tensors are overwritten: untouched tensors are copied as raw bytes in bounded chunks (they
never become torch tensors), and the header stays byte-identical unless tensors are added.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modapt import ModaptError
from modapt.untrusted import UntrustedFileError, read_json, read_safetensors_header

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
COPY_CHUNK = 1 << 20  # bytes per read when the kernel cannot copy file ranges itself

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ModaptError):
    """The base checkpoint is missing, unreadable, truncated or not safetensors."""


@dataclass
class TensorEntry:
    """Where one tensor lies: its shard, dtype name (``F32``), shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class ShardHeader:
    """The parsed header of one safetensors file."""

    raw: bytes  # the 8-byte length and the JSON, exactly as stored
    entries: dict[str, dict]  # key -> {"dtype", "shape", "data_offsets"}
    metadata: dict | None
    data_start: int
    size: int


def read_header(path: Path) -> ShardHeader:
    """Parse and check a safetensors header: what any reader checks, then what the merge needs.

    The file-level checks (length prefix, bounded JSON, ``dtype`` a name, ``shape`` integers
    >= 0, offsets inside a file that holds exactly header + data) are
    :func:`modapt.untrusted.read_safetensors_header`'s, one implementation for core and
    export; on top, the merge copies byte ranges blindly, so each range must be exactly
    ``numel * itemsize`` of a dtype it handles and the ranges must tile the data (no holes,
    no overlaps).
    """
    try:
        header, metadata, size = read_safetensors_header(path)
    except UntrustedFileError as exc:
        raise CheckpointError(f"{exc} (not a usable safetensors shard)") from None
    try:  # the header bytes as stored: an output shard with no added tensor reuses them verbatim
        with open(path, "rb") as f:
            prefix = f.read(8)
            text = f.read(struct.unpack("<Q", prefix)[0]) if len(prefix) == 8 else b""
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    data_start = 8 + len(text)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if len(prefix) != 8 or data_start + data_end != size:
        raise CheckpointError(f"{path}: changed while being read (file replaced during the merge?)")
    spans = []
    for key, info in header.items():
        (begin, end), dtype, shape = info["data_offsets"], info["dtype"], info["shape"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{key}' has dtype {dtype!r}, which this merge does not handle")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: tensor '{key}' spans {end - begin} bytes, its shape {shape} and dtype "
                                  f"{dtype} need {numel * DTYPES[dtype].itemsize}")
        spans.append((begin, end, key))
    spans.sort()
    cursor = 0
    for begin, end, key in spans:
        if begin != cursor:
            raise CheckpointError(f"{path}: tensor '{key}' starts at {begin}, expected {cursor} (holes or overlaps)")
        cursor = end
    return ShardHeader(prefix + text, header, metadata or None, data_start, size)


@dataclass
class Checkpoint:
    """A safetensors checkpoint folder, read lazily: headers now, tensors on demand."""

    directory: Path
    files: list[str]  # shard file names in order
    index: dict | None  # the parsed index file of a sharded checkpoint
    headers: dict[str, ShardHeader] = field(default_factory=dict)
    entries: dict[str, TensorEntry] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Checkpoint:
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such checkpoint folder")
        index_path = directory / INDEX_NAME
        if index_path.is_file():
            try:
                index = read_json(index_path)
                weight_map = index["weight_map"]
                files = sorted(set(weight_map.values()))
            except UntrustedFileError as exc:
                raise CheckpointError(str(exc)) from None
            except (KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from None
        elif (directory / SINGLE_NAME).is_file():
            index, files = None, [SINGLE_NAME]
        else:
            pickles = [n for n in PICKLE_WEIGHTS if (directory / n).exists()]
            hint = (f" ({', '.join(pickles)} found: pickle checkpoints are not read; convert them with "
                    "save_pretrained(safe_serialization=True))") if pickles else ""
            raise CheckpointError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        ckpt = cls(directory, files, index)
        for name in files:
            if Path(name).name != name:
                raise CheckpointError(f"{index_path}: shard name {name!r} is not a plain file name")
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{directory}: shard {name} listed in {INDEX_NAME} is missing")
            header = read_header(path)
            ckpt.headers[name] = header
            for key, info in header.entries.items():
                if key in ckpt.entries:
                    raise CheckpointError(f"{directory}: tensor '{key}' is stored twice ({ckpt.entries[key].file}, "
                                          f"{name})")
                begin, end = info["data_offsets"]
                ckpt.entries[key] = TensorEntry(name, info["dtype"], tuple(info["shape"]),
                                                header.data_start + begin, header.data_start + end)
        if index is not None:
            for key, name in index["weight_map"].items():
                if ckpt.entries.get(key) is None or ckpt.entries[key].file != name:
                    raise CheckpointError(f"{index_path}: '{key}' is listed in {name} but is not stored there")
        return ckpt

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys_in(self, file: str) -> list[str]:
        return [k for k, e in self.entries.items() if e.file == file]

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read alone from its byte range into fresh memory.

        Not through ``safe_open``: its memory map keeps the pages it touched resident until
        the object is collected, which made the RSS of a merge creep up shard after shard.
        The header was checked when the checkpoint was opened (dtype, shape, offsets).
        """
        entry = self.entries.get(key)
        if entry is None:
            raise KeyError(key)
        tensor = torch.empty(entry.shape, dtype=entry.torch_dtype)
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        try:
            with open(self.directory / entry.file, "rb") as f:
                f.seek(entry.begin)
                got = f.readinto(view) if len(view) else 0
        except OSError as exc:
            raise CheckpointError(f"{self.directory / entry.file}: cannot read '{key}': {exc}") from None
        if got != entry.end - entry.begin:
            raise CheckpointError(f"{self.directory / entry.file}: '{key}' ends early (file changed during the merge?)")
        return tensor


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as safetensors stores them (little-endian, row-major)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_shard(source: Path, header: ShardHeader, target: Path,
                replace: dict[str, Callable[[], torch.Tensor]],
                add: Iterable[tuple[str, TensorEntry, Callable[[], torch.Tensor]]] = ()) -> None:
    """Write ``target`` as a copy of shard ``source`` with some tensors replaced or added.

    replace: key -> function giving the new tensor (same dtype and shape as stored; called
        when the writer reaches that tensor, so one replacement is alive at a time).
    add: (key, entry with dtype and shape, function) for tensors appended after the data
        (a tied weight written out separately); the header is rebuilt only then.
    """
    add = list(add)
    entries = header.entries
    if add:
        new = {k: dict(v) for k, v in entries.items()}
        cursor = max((v["data_offsets"][1] for v in entries.values()), default=0)
        for key, entry, _ in add:
            nbytes = entry.end - entry.begin
            new[key] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [cursor, cursor + nbytes]}
            cursor += nbytes
        if header.metadata is not None:
            new = {"__metadata__": header.metadata, **new}
        text = json.dumps(new, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        raw_header = struct.pack("<Q", len(text)) + text
    else:
        raw_header = header.raw
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in entries.items())
    try:
        _write_shard(source, target, raw_header, header, spans, entries, replace, add)
    except OSError as exc:
        # a failed read() or write() carries no file name: name the shard being written (a full
        # disk, quota or ulimit -f can only be the write), else both files
        if exc.filename is None:
            where = str(target) if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else f"{source} -> {target}"
            raise OSError(exc.errno, exc.strerror, where) from exc
        raise


def _write_shard(source, target, raw_header, header, spans, entries, replace, add) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(raw_header)
        for begin, end, key in spans:
            if key in replace:
                info = entries[key]
                _write_tensor(dst, key, replace[key](), info["dtype"], tuple(info["shape"]))
            else:
                _copy_range(src, dst, header.data_start + begin, end - begin)
        for key, entry, fn in add:
            _write_tensor(dst, key, fn(), entry.dtype, entry.shape)
        dst.flush()
        os.fsync(dst.fileno())


def _write_tensor(dst, key: str, tensor: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> None:
    if DTYPE_NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"internal: '{key}' would be written as {tensor.dtype} {list(tensor.shape)}, "
                              f"stored as {dtype} {list(shape)}")
    dst.write(tensor_bytes(tensor))


def _copy_range(src, dst, offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to the end of ``dst`` in bounded memory.

    The kernel copies the range itself where it can (``copy_file_range``: no bytes pass
    through this process, so RSS does not grow); otherwise a 1 MiB buffer is reused.
    """
    dst.flush()
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            while length > 0:
                done = copy_range(src.fileno(), dst.fileno(), min(length, 1 << 30), offset)
                if done == 0:
                    raise CheckpointError(f"{src.name}: ended early while copying (file changed during the merge?)")
                offset += done
                length -= done
            dst.seek(0, os.SEEK_END)
            return
        except OSError:  # another file system or an old kernel: copy through a buffer
            dst.seek(0, os.SEEK_END)
    buffer = bytearray(min(COPY_CHUNK, max(length, 1)))
    view = memoryview(buffer)
    src.seek(offset)
    while length > 0:
        got = src.readinto(view[: min(len(buffer), length)])
        if not got:
            raise CheckpointError(f"{src.name}: ended early while copying (file changed during the merge?)")
        dst.write(view[:got])
        length -= got
