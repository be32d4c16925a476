"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

No pickle anywhere: tensors go through safetensors, everything else through JSON. Each file
is written to a temporary name and renamed into place; the config records the sha256 of the
tensor file, so a pair that does not belong together is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import named as named_mod
from .apply import adapter_state_dict, apply, is_adapted, remove, state_of
from .errors import AdapterLoadError, ModaptError, StateError
from .fingerprint import FINGERPRINT_ALGORITHM, QuantizedStored, fingerprint, first_mismatch
from .recipe import parse_recipe
from .registry import Registry, default_registry

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "modapt-adapter"
FORMAT_VERSION = 1
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (an FSDP2 shard; a collective: every rank must call it), else itself."""
    if hasattr(tensor, "full_tensor") and hasattr(tensor, "placements"):
        return tensor.full_tensor()
    return tensor


def quantized_stored(layer: nn.Module) -> QuantizedStored | None:
    """The fingerprint input of a quantized layer's weight (see :mod:`modapt.fingerprint`), else ``None``."""
    from . import quantized

    kind = quantized.kind_of(layer)
    if kind is None:
        return None
    return QuantizedStored(kind.name, kind.stored(layer), (int(layer.out_features), int(layer.in_features)))


def base_weight_getter(model: nn.Module):
    """``get(key)`` for the fingerprint: the base tensor as the unadapted model stores it."""
    state = model.__dict__.get("modapt_state")
    by_key = {}
    if state is not None:
        for path, host in state.layers.items():
            original = host.quantized_base if host.merged else host.base_layer
            if original is not None and quantized_stored(original) is not None:
                by_key[state.base_keys[path]] = quantized_stored(original)
            else:
                by_key[state.base_keys[path]] = host._w0_backup if host.merged else host.base_layer.weight

    def get(key: str) -> torch.Tensor:
        if key in by_key:
            return by_key[key] if isinstance(by_key[key], QuantizedStored) else full_tensor(by_key[key])
        path, _, name = key.rpartition(".")
        if name == "weight":  # a quantized layer of a model not (yet) adapted: what it stores
            try:
                stored = quantized_stored(model.get_submodule(path))
            except AttributeError:
                stored = None
            if stored is not None:
                return stored
        try:
            return full_tensor(model.get_parameter(key))
        except AttributeError:
            raise KeyError(key) from None

    return get


def save(model: nn.Module, directory: str | os.PathLike, name: str | None = None, *,
         registry: Registry | None = None) -> Path:
    """Write the model's adapter to ``directory`` (created if needed) and return its path.

    ``adapter_model.safetensors`` holds exactly the adapter tensors, named as in
    ``named_parameters()``; ``adapter_config.json`` the resolved recipe, the format version,
    the versions of modapt and of each plugin used, and the base fingerprint.
    ``name``: which adapter of a model holding several (the folder gets that one alone, under
    single-adapter tensor names, and remembers the name); ``None``: the only one.
    """
    with named_mod.viewing(model, name) as state:
        return _save(model, directory, state.name, registry)


def _save(model: nn.Module, directory: str | os.PathLike, name: str, registry: Registry | None) -> Path:
    from safetensors.torch import save as st_save

    registry = registry or default_registry()
    state = state_of(model)
    if state.unloaded:
        raise StateError("merge(unload=True) folded the weight adapters; there is no adapter left to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: full_tensor(v).detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    blob = st_save(tensors, metadata={"format": "pt", "modapt_format_version": str(FORMAT_VERSION)})
    digest, per_tensor = fingerprint(state.base_keys.values(), base_weight_getter(model))
    dists = sorted({registry.method(m).distribution for m in state.recipe.methods()})
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "recipe": state.recipe.to_dict(),
        "versions": {"modapt": _version("modapt"), **{d: _version(d) for d in dists if d != "modapt"}},
        "base_model": {
            "class": type(model).__name__,
            "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", ""),
        },
        "base_fingerprint": {"algorithm": FINGERPRINT_ALGORITHM, "sha256": digest, "tensors": per_tensor},
        "weights": {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(blob).hexdigest(), "count": len(tensors)},
    }
    # tensors first, then the config that vouches for them: a kill in between leaves a pair the
    # loader refuses (sha256 mismatch), never one it loads wrongly
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The adapter config of ``directory``, checked for format and version."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"{directory}: no such adapter directory")
    path = directory / CONFIG_NAME
    if not path.is_file():
        pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
        extra = f" ({', '.join(pickles)} found: pickle files are never loaded)" if pickles else ""
        raise AdapterLoadError(f"{directory}: no {CONFIG_NAME}{extra}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object")
    if "peft_type" in config:
        raise AdapterLoadError(
            f"{directory} is a PEFT adapter ({config['peft_type']}); read it with modapt_export.load_peft "
            "(pip install modapt-export)")
    if config.get("format") != FORMAT:
        raise AdapterLoadError(f"{path}: not a modapt adapter (format {config.get('format')!r})")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise AdapterLoadError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterLoadError(
            f"{path}: format version {version} is newer than this modapt reads ({FORMAT_VERSION}); upgrade modapt")
    if version < 1:
        raise AdapterLoadError(f"{path}: unknown format version {version}")
    for key in ("recipe", "base_fingerprint", "weights"):
        if not isinstance(config.get(key), dict):
            raise AdapterLoadError(f"{path}: missing or invalid '{key}'")
    return config


def read_tensors(directory: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter tensors, after checking the file against the sha256 its config records."""
    from safetensors.torch import load as st_load

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{directory}: no {WEIGHTS_NAME}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != config["weights"].get("sha256"):
        raise AdapterLoadError(f"{path}: does not match the sha256 in {CONFIG_NAME} (truncated, edited, or "
                               "from another save)")
    try:
        return st_load(data)
    except Exception as exc:
        raise AdapterLoadError(f"{path}: not a readable safetensors file: {exc}") from None


def load(model: nn.Module, directory: str | os.PathLike, name: str | None = None, *,
         registry: Registry | None = None, verify_base: bool = True,
         autocast_adapter_dtype: bool = True) -> nn.Module:
    """Apply the adapter saved in ``directory`` to a base ``model`` and load its tensors.

    Every check runs before the model changes, and a failure after ``apply`` undoes it, so
    on error the model is left as it was. ``verify_base=False`` skips the fingerprint check
    (for a base in another dtype than the one trained on, say); shapes are always checked.
    ``name``: the adapter's name on the model (default: the name saved in the folder, else
    "default"); on a model that has adapters it is added beside them (a name it holds is an error).
    """
    registry = registry or default_registry()
    directory = Path(directory)
    config = read_config(directory)
    name = name if name is not None else config.get("name") or named_mod.DEFAULT_NAME
    if is_adapted(model) and name in named_mod.adapters(model):
        raise AdapterLoadError(f"{directory}: the model already has an adapter named '{name}' "
                               "(pass another name= or modapt.delete it first)")
    try:
        recipe = parse_recipe(config["recipe"], registry)
    except ModaptError as exc:
        raise AdapterLoadError(f"{directory}: the saved recipe cannot be used here: {exc}") from None
    expected = config["base_fingerprint"].get("tensors", {})
    if verify_base:
        get = base_weight_getter(model)
        try:
            _, actual = fingerprint(expected.keys(), get)
        except KeyError as exc:
            raise AdapterLoadError(f"{directory}: base tensor {exc} is missing from this model") from None
        problem = first_mismatch(expected, actual)
        if problem:
            raise AdapterLoadError(f"{directory}: {problem} (pass verify_base=False to load anyway)")
    tensors = read_tensors(directory, config)
    alone = not is_adapted(model)
    apply(model, recipe, name, registry=registry, autocast_adapter_dtype=autocast_adapter_dtype)
    try:
        with named_mod.viewing(model, name):
            _copy_in(model, tensors, directory)
    except BaseException:
        remove(model) if alone else named_mod.delete(model, name)
        raise
    return model


@torch.no_grad()
def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    targets = adapter_state_dict(model)
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets))
    if missing:
        raise AdapterLoadError(f"{directory}: tensor '{missing[0]}' is missing from {WEIGHTS_NAME}"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    if extra:
        raise AdapterLoadError(f"{directory}: unexpected tensor '{extra[0]}' in {WEIGHTS_NAME} "
                               "(the recipe does not create it)")
    for name in sorted(targets):
        want, got = targets[name], tensors[name]
        if tuple(want.shape) != tuple(got.shape):
            raise AdapterLoadError(f"{directory}: tensor '{name}' has shape {list(got.shape)}, "
                                   f"this model needs {list(want.shape)}")
        if want.dtype != got.dtype:
            raise AdapterLoadError(f"{directory}: tensor '{name}' has dtype {got.dtype}, expected {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise AdapterLoadError(f"{directory}: tensor '{name}' has NaN or Inf values")
    for name in sorted(targets):
        targets[name].copy_(tensors[name])
