"""Saving and loading adapters: a folder that modapt, and PEFT where it can, reads.

Format 2 (this release): ``modapt_adapter.safetensors`` holds modapt's tensors; the config is
``adapter_config.json`` (PEFT's config + modapt's fields, with PEFT's tensors in
``adapter_model.safetensors``) when PEFT can express the adapter, else ``modapt_adapter.json``.
Format 1 (earlier releases): ``adapter_config.json`` + ``adapter_model.safetensors``, modapt's
schema; still read.

No pickle anywhere: tensors go through safetensors, everything else through JSON read under
size and depth limits (:mod:`modapt.untrusted`). The whole folder is written beside the old one
and swapped in atomically (:mod:`modapt.atomic_folder`); the config records the sha256 of the
tensor file, so a pair that does not belong together is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import named as named_mod
from .apply import adapter_state_dict, apply, is_adapted, remove, state_of
from .atomic_folder import replace_folder, resolve
from .errors import AdapterLoadError, ModaptError, StateError
from .fingerprint import FINGERPRINT_ALGORITHM, QuantizedStored, fingerprint, first_mismatch
from .recipe import parse_recipe
from .registry import Registry, default_registry
from .untrusted import UntrustedFileError, read_json, read_safetensors_header

CONFIG_NAME = "adapter_config.json"  # PEFT's name: format 1, and format 2 when PEFT can read the adapter
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name: format 1 (modapt's tensors), format 2 (PEFT's)
MODAPT_CONFIG_NAME = "modapt_adapter.json"  # format 2 when PEFT cannot read the adapter
WEIGHTS_NAME_V2 = "modapt_adapter.safetensors"  # format 2: modapt's tensors, always
OWNED_NAMES = (CONFIG_NAME, WEIGHTS_NAME, MODAPT_CONFIG_NAME, WEIGHTS_NAME_V2)
FORMAT = "modapt-adapter"
FORMAT_VERSION = 2
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
    """Write the model's adapter to ``directory`` (created if needed), replacing it atomically; return its path.

    ``modapt_adapter.safetensors`` holds exactly the adapter tensors, named as in
    ``named_parameters()``. When every entry of the recipe has a PEFT format (LoRA, rsLoRA,
    DoRA, AdaLoRA; modapt-export installed), the folder is also a PEFT folder:
    ``adapter_config.json`` holds PEFT's config with modapt's fields beside it (the resolved
    recipe, the format version, the versions of modapt and of each plugin, the base
    fingerprint, the tensor file's sha256) and ``adapter_model.safetensors`` the tensors under
    PEFT's names. Otherwise the config is ``modapt_adapter.json``, a name PEFT and transformers
    do not look for. The old folder is swapped for the new one in one step
    (:mod:`modapt.atomic_folder`): a reader sees one complete save or the other, and a second
    process saving into the same folder at the same time fails with ``FolderBusyError``.
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
        "weights": {"file": WEIGHTS_NAME_V2, "sha256": hashlib.sha256(blob).hexdigest(), "count": len(tensors),
                    "bytes": len(blob)},
    }
    peft = _peft_files(model, registry, tensors)

    def write(folder: Path) -> list[str]:
        _write_file(folder / WEIGHTS_NAME_V2, blob)
        if peft is None:
            _write_file(folder / MODAPT_CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
            return [WEIGHTS_NAME_V2, MODAPT_CONFIG_NAME]
        peft_config, peft_blob = peft
        _write_file(folder / WEIGHTS_NAME, peft_blob)
        # PEFT's fields first, modapt's beside them: PEFT drops keys its config class lacks
        merged = {**peft_config, **config}
        _write_file(folder / CONFIG_NAME, (json.dumps(merged, indent=2) + "\n").encode())
        return [WEIGHTS_NAME_V2, WEIGHTS_NAME, CONFIG_NAME]

    return replace_folder(directory, write, owned=OWNED_NAMES)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _peft_files(model: nn.Module, registry: Registry,
                tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], bytes] | None:
    """(PEFT config, PEFT tensor file) when the adapter has a PEFT format and modapt-export is
    installed (it holds PEFT's format), else ``None``."""
    try:
        from modapt_export.peft_format import PeftFormatError, peft_payload
    except ImportError:
        return None
    try:
        return peft_payload(model, registry=registry, tensors=tensors)
    except PeftFormatError:
        return None


def _locate(directory: Path) -> tuple[Path, bool]:
    """(config path, whether the config is modapt-only) of an adapter folder, or an error."""
    own = directory / MODAPT_CONFIG_NAME
    if own.is_file():
        return own, True
    path = directory / CONFIG_NAME
    if path.is_file():
        return path, False
    pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
    extra = f" ({', '.join(pickles)} found: pickle files are never loaded)" if pickles else ""
    raise AdapterLoadError(f"{directory}: no {CONFIG_NAME} or {MODAPT_CONFIG_NAME}{extra}")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The adapter config of ``directory``, checked for format and version (both layouts).

    Format 1 (modapt <= 0.x): ``adapter_config.json`` + ``adapter_model.safetensors``, modapt's
    schema only. Format 2: see :func:`save`.
    """
    directory = resolve(Path(directory))
    if not directory.is_dir():
        raise AdapterLoadError(f"{directory}: no such adapter directory")
    path, _ = _locate(directory)
    try:
        config = read_json(path)
    except UntrustedFileError as exc:
        raise AdapterLoadError(str(exc)) from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object")
    if "peft_type" in config and config.get("format") != FORMAT:
        raise AdapterLoadError(
            f"{directory} is a PEFT adapter ({config['peft_type']}); read it with modapt_export.load_peft "
            "(pip install modapt-export)")
    if config.get("format") != FORMAT:
        raise AdapterLoadError(f"{path}: not a modapt adapter (format {config.get('format')!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
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


def _weights_path(directory: Path, config: dict[str, Any]) -> Path:
    # the file name follows from the version, never from the (untrusted) config's text
    return directory / (WEIGHTS_NAME if config["format_version"] == 1 else WEIGHTS_NAME_V2)


def read_tensors(directory: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter tensors, after checking the file's header and size, then its streamed sha256.

    The safetensors header is read first under limits (:mod:`modapt.untrusted`) and the file
    size must be what it describes, so a huge or truncated file is refused before being hashed;
    the hash streams in 4 MB blocks and the tensors are then memory-mapped, never read whole.
    """
    from safetensors.torch import load_file

    directory = resolve(Path(directory))
    path = _weights_path(directory, config)
    if not path.is_file():
        raise AdapterLoadError(f"{directory}: no {path.name}")
    try:
        read_safetensors_header(path)
    except UntrustedFileError as exc:
        raise AdapterLoadError(f"{exc} (truncated, edited, or from another save)") from None
    expected = config["weights"].get("sha256")
    if file_sha256(path) != expected:
        raise AdapterLoadError(f"{path}: does not match the sha256 in {CONFIG_NAME} (truncated, edited, or "
                               "from another save)")
    try:
        return load_file(path)
    except Exception as exc:
        raise AdapterLoadError(f"{path}: not a readable safetensors file: {exc}") from None


def expected_fingerprint(config: dict[str, Any], directory: Path) -> dict[str, dict]:
    """The per-tensor base fingerprint a config records, checked; no fingerprint is an error
    (an adapter for an unknown base is refused unless ``verify_base=False``)."""
    hint = " (pass verify_base=False to load anyway)"
    tensors = config["base_fingerprint"].get("tensors")
    # an adapter of attachments only touches no base tensor: its record is {} with the digest of
    # nothing; anything else without entries is an unknown base (checked again after apply)
    empty = config["base_fingerprint"].get("sha256") == hashlib.sha256().hexdigest()
    if not isinstance(tensors, dict) or not (tensors or empty):
        raise AdapterLoadError(f"{directory}: the adapter records no base fingerprint, so the base it was "
                               f"trained on is unknown{hint}")
    for key, entry in tensors.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("sha256"), str) and isinstance(entry.get("shape"), list)
              and all(type(d) is int for d in entry["shape"]))
        if not ok:
            raise AdapterLoadError(f"{directory}: malformed base fingerprint entry for '{key}' "
                                   f"(dtype, shape and sha256 expected){hint}")
    return tensors


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
    directory = resolve(Path(directory))
    config = read_config(directory)
    name = name if name is not None else config.get("name") or named_mod.DEFAULT_NAME
    if is_adapted(model) and name in named_mod.adapters(model):
        raise AdapterLoadError(f"{directory}: the model already has an adapter named '{name}' "
                               "(pass another name= or modapt.delete it first)")
    try:
        recipe = parse_recipe(config["recipe"], registry)
    except ModaptError as exc:
        raise AdapterLoadError(f"{directory}: the saved recipe cannot be used here: {exc}") from None
    if verify_base:
        expected = expected_fingerprint(config, directory)
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
        if verify_base and not expected and named_mod.state_named(model, name).base_keys:
            # "touches no base tensor" (attachments only) was recorded, but the recipe does touch some
            raise AdapterLoadError(f"{directory}: the adapter records no base fingerprint, but its recipe adapts "
                                   "base weights: the base it was trained on is unknown (pass verify_base=False "
                                   "to load anyway)")
        with named_mod.viewing(model, name):
            _copy_in(model, tensors, directory)
    except BaseException:
        remove(model) if alone else named_mod.delete(model, name)
        raise
    return model


def restore(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Read the tensors of the adapter folder ``directory`` back into ``model``, which already
    holds the same recipe (a Trainer resuming from a checkpoint, loading its best one).

    The folder's recipe must equal the model's (else :class:`AdapterLoadError`); its tensors are
    checked as by :func:`load` (names, shapes, dtypes, finite values) before any is copied.
    """
    directory = resolve(Path(directory))
    config = read_config(directory)
    state = state_of(model)
    if config["recipe"] != json.loads(json.dumps(state.recipe.to_dict())):  # as saved: lists, not tuples
        raise AdapterLoadError(f"{directory}: holds another recipe than the model's adapter "
                               "(use modapt.load on a base model)")
    _copy_in(model, read_tensors(directory, config), directory)
    return model


@torch.no_grad()
def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    targets = adapter_state_dict(model)
    missing = sorted(set(targets) - set(tensors))
    extra = sorted(set(tensors) - set(targets))
    versioned = [m for m in missing if m.endswith("_format_version")]
    if versioned:  # a method whose saved format changed records its version as a tensor (QuanTA)
        raise AdapterLoadError(f"{directory}: '{versioned[0]}' is missing: this adapter was saved in an older, "
                               "incompatible format of the method (see its README); retrain it")
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
