"""Streaming merge of an adapter into a safetensors checkpoint: ``merge_checkpoint``.

The model is never loaded. A skeleton of it is built on the ``meta`` device from
``config.json`` (no memory, no weights) to resolve the recipe's targets exactly as training
did and to see which weights are tied. Then, one layer at a time, a tiny host is built: a
copy of the layer's meta module holding the real base tensor (read alone from its shard),
wrapped by :class:`modapt.AdaptedLayer`, its method built from the recipe through the
registry and the adapter's tensors copied in; ``host.merged_weight()`` gives W* (fp32
inside, the stored dtype out). The merge knows no method by name: each plugin's reparam
and update do the work through the update contract.

Each output shard is its input shard with the merged tensors' bytes overwritten (see
:mod:`modapt_export.shards`); everything else is copied through byte for byte. The output
is written into a hidden folder ``.OUT.PID.*.partial`` beside ``out_dir`` and put in place at
the end, so a failed merge leaves no output folder. Replacing an existing ``out_dir``
(``overwrite``) is one atomic exchange of the two directories (Linux ``renameat2`` with
``RENAME_EXCHANGE``): at every instant ``out_dir`` is the previous output or the new one,
whole. Where the filesystem cannot exchange, the old folder is moved aside to ``.OUT.old-PID``
first; a kill between the two renames leaves no ``out_dir`` and the next merge into it moves
the old folder back before it starts. Leftovers of killed merges (``.OUT.PID.*.partial``,
``.OUT.old-PID`` whose process is dead) are removed by the next merge into the same
``out_dir``. ``out_dir`` may not be, contain or lie inside the base or the adapter folder.

Side files (config, tokenizer) that are symbolic links are copied as links to their resolved
absolute target, never through them: a link planted in a downloaded base folder (to a key
file, say) never puts that file's bytes into the merged output, and Hugging Face cache
snapshots (every file a link into ``blobs/``) still give a working output.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import modapt
import torch
from modapt import AdaptedLayer, ModaptError, layers
from modapt.apply import build_weight_adapter
from modapt.fingerprint import fingerprint, first_mismatch
from modapt.recipe import AdapterSpec, Recipe, parse_recipe
from modapt.registry import Registry, default_registry
from torch import nn

from .progress import SILENT, Progress
from .shards import INDEX_NAME, PICKLE_WEIGHTS, Checkpoint, CheckpointError, TensorEntry, write_shard

WEIGHT_FAMILIES = ("update", "reparam")
# weight files in other formats would ship the unmerged weights next to the merged ones
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


class MergeError(ModaptError):
    """The adapter cannot be merged into this base (mismatch, non-finite result, unsupported)."""


# Fault injection (tests only): called with the name of every rename / file-replacement
# boundary of a merge, so that a test can kill the process at each one deterministically.
FAULT_HOOK: Callable[[str], None] | None = None


def _boundary(point: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(point)


@dataclass
class AdapterSource:
    """An adapter read from disk, whatever its format, with modapt's tensor names.

    fingerprint: {base key: {"dtype", "shape", "sha256"}} recorded at save time, or ``None``
        (PEFT adapters record none).
    """

    directory: Path
    recipe: Recipe
    tensors: dict[str, torch.Tensor]
    fingerprint: dict[str, dict] | None
    origin: str  # "modapt" or "peft"
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT's stored shared state (VeRA's vera_A...)


@dataclass
class LayerPlan:
    """One adapted layer: its module path, the base key it changes, its meta module and spec."""

    path: str
    key: str
    module: nn.Module
    spec: AdapterSpec
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # own key -> adapter tensor


def read_adapter(directory: str | os.PathLike, registry: Registry | None = None, *,
                 verify_base: bool = True) -> AdapterSource:
    """Read a modapt adapter folder, or a PEFT one (``peft_type`` in its config).

    With ``verify_base`` a modapt folder must record a well-formed base fingerprint (as
    :func:`modapt.load` requires): ``base_fingerprint: {}`` or malformed entries mean an unknown
    base, refused in one line; PEFT folders record none.
    """
    from modapt import persistence

    registry = registry or default_registry()
    directory = Path(directory)
    config_path = directory / persistence.CONFIG_NAME
    if config_path.is_file():
        from modapt.untrusted import UntrustedFileError, read_json

        try:
            raw = read_json(config_path)
        except UntrustedFileError as exc:
            raise modapt.AdapterLoadError(str(exc)) from None
        if isinstance(raw, dict) and "peft_type" in raw and raw.get("format") != persistence.FORMAT:
            from .peft_format import read_peft_adapter, split_shared

            recipe, tensors = read_peft_adapter(directory, registry)
            tensors, shared = split_shared(tensors)
            return AdapterSource(directory, parse_recipe(recipe, registry), tensors, None, "peft", shared)
    config = persistence.read_config(directory)
    try:
        recipe = parse_recipe(config["recipe"], registry)
    except ModaptError as exc:
        raise modapt.AdapterLoadError(f"{directory}: the saved recipe cannot be used here: {exc}") from None
    fingerprint = None
    if verify_base:
        try:
            fingerprint = persistence.expected_fingerprint(config, directory)
        except modapt.AdapterLoadError as exc:
            hint = "pass verify_base=False (modapt merge --no-verify-base) to merge anyway"
            raise MergeError(str(exc).replace("(pass verify_base=False to load anyway)", f"({hint})")
                             if "verify_base" in str(exc) else f"{exc} ({hint})") from None
    tensors = persistence.read_tensors(directory, config)
    return AdapterSource(directory, recipe, tensors, fingerprint, "modapt")


def skeleton(base_dir: str | os.PathLike, config_overrides: dict | None = None) -> nn.Module:
    """The base model built on the ``meta`` device from its ``config.json``: names, classes, ties."""
    import transformers

    base_dir = Path(base_dir)
    read_base_config(base_dir)  # size, depth and JSON checked before transformers parses it
    try:
        config = transformers.AutoConfig.from_pretrained(base_dir, **(config_overrides or {}))
    except Exception as exc:
        raise CheckpointError(f"{base_dir}/config.json: transformers cannot read it: {exc}") from None
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise CheckpointError(f"{base_dir}/config.json: 'architectures' ({names}) names no class of this "
                              f"transformers ({transformers.__version__})")
    with torch.device("meta"):
        model = cls(config)
    model.eval()
    return model


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Lists of parameter names that share one tensor (``lm_head.weight`` and the embedding)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def check_mergeable(recipe: Recipe, registry: Registry) -> None:
    """Refuse adapters that cannot be folded into weights, naming the method and the way out."""
    for name in recipe.methods():
        method = registry.method(name)
        if not method.capabilities.mergeable or method.family not in WEIGHT_FAMILIES:
            raise MergeError(
                f"the adapter uses '{name}' ({method.family} family), which cannot be folded into the weights of a "
                "plain checkpoint; export the adapted model with 'modapt export onnx' instead, which writes it into "
                "the graph")


def plan_layers(model: nn.Module, source: AdapterSource, registry: Registry) -> tuple[list[LayerPlan], list[str]]:
    """(adapted layers, modules_to_save paths), every adapter tensor assigned to exactly one of them."""
    from modapt.apply import plan_targets  # target resolution exactly as modapt.apply does it, without building
    from modapt.targets import match_targets

    plans = []
    for path, _, spec in plan_targets(model, source.recipe, registry):
        module = model.get_submodule(path)
        plans.append(LayerPlan(path, f"{path}.weight", module, spec))
    saved = []
    if source.recipe.modules_to_save:
        saved = match_targets(model, source.recipe.modules_to_save, path="modules_to_save")
    owners = {p.path: p for p in plans}
    for name, tensor in source.tensors.items():
        parent = name.rpartition(".")[0]
        owner = None
        while parent:
            if parent in owners or parent in saved:
                owner = parent
                break
            parent = parent.rpartition(".")[0]
        if owner is None:
            raise MergeError(f"{source.directory}: tensor '{name}' belongs to no adapted layer or module to save of "
                             "this base model (an adapter for another model?)")
        if owner in owners:
            owners[owner].tensors[name[len(owner) + 1:]] = tensor
    return plans, saved


def build_shared(model: nn.Module, plans: list[LayerPlan], registry: Registry) -> dict[str, tuple]:
    """Give state shared across layers (:mod:`modapt.shared`, VeRA's A [r, in_max] and B
    [out_max, r]) its final size on the skeleton before the first layer is merged: its sizes
    are maxima over all adapted layers, so a layer merged first would otherwise see a smaller
    draw. Returns ``{buffer path: shape}`` of that state, which no later build may change.

    One layer per adapter entry is built on its ``meta`` module; only entries whose build
    registered shared state get their other layers built too. A build that fails on ``meta``
    (DoRA's row norms mix meta and CPU tensors) registers nothing and is left to the real build.
    """
    from modapt import shared

    def shared_count() -> int:
        return len(getattr(model, shared.SHARED_ATTR, None) or {})

    by_entry: dict[int, list[LayerPlan]] = {}
    for plan in plans:
        by_entry.setdefault(id(plan.spec), []).append(plan)
    with shared.applying(model), torch.no_grad():
        for entry_plans in by_entry.values():
            before = shared_count()
            for i, plan in enumerate(entry_plans):
                try:
                    build_weight_adapter(AdaptedLayer(copy.deepcopy(plan.module)), plan.spec, registry)
                except Exception:  # noqa: BLE001 - see the docstring; the real build reports its own errors
                    break
                if i == 0 and shared_count() == before:
                    break  # no shared state: its layers are built for real, one at a time
    return _shared_shapes(model)


def _shared_shapes(model: nn.Module) -> dict[str, tuple]:
    from modapt import shared

    table = getattr(model, shared.SHARED_ATTR, None)
    return {name: tuple(b.shape) for name, b in table.named_buffers()} if table is not None else {}


def build_host(plan: LayerPlan, get: Callable[[str], torch.Tensor], registry: Registry,
               model: nn.Module | None = None) -> AdaptedLayer:
    """A one-layer host: the layer's module with its real base tensors, the adapter built and loaded.

    ``get(key)`` reads one base tensor (weight [out, in] as stored, bias [out]); ``model``: the
    skeleton holding the shared state :func:`build_shared` made (methods that use some need it).
    """
    from modapt import shared

    module = copy.deepcopy(plan.module)  # meta: costs nothing, keeps class and options (padding_idx...)
    for name, _ in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(get(f"{plan.path}.{name}"), requires_grad=False))
    host = AdaptedLayer(module)
    try:
        if model is None:
            build_weight_adapter(host, plan.spec, registry)
        else:
            with shared.applying(model):
                build_weight_adapter(host, plan.spec, registry)
    except ValueError as exc:
        raise MergeError(f"cannot rebuild the adapter of '{plan.path}': {exc}") from None
    update = host.update
    host.eval()
    targets = {n: p for n, p in host.named_parameters() if not n.startswith("base_layer.")}
    targets.update(update.extra_state())
    missing = sorted(set(targets) - set(plan.tensors))
    extra = sorted(set(plan.tensors) - set(targets))
    if missing or extra:
        what = f"missing '{plan.path}.{missing[0]}'" if missing else f"unexpected '{plan.path}.{extra[0]}'"
        raise MergeError(f"the adapter tensors do not fit the recipe's '{plan.spec.method}' on '{plan.path}': {what}")
    with torch.no_grad():
        for name, target in targets.items():
            got = plan.tensors[name]
            if tuple(got.shape) != tuple(target.shape):
                raise MergeError(f"adapter tensor '{plan.path}.{name}' has shape {list(got.shape)}, this base needs "
                                 f"{list(target.shape)}")
            target.copy_(got)
    return host


def merged_tensor(plan: LayerPlan, get, registry: Registry, safe: bool, model: nn.Module | None = None
                  ) -> torch.Tensor:
    """W* of one layer, laid out and typed as the checkpoint stores its weight."""
    host = build_host(plan, get, registry, model)
    if model is not None and _shared_shapes(model) != getattr(model, "_modapt_merge_shared", {}):
        raise MergeError(f"building '{plan.path}' changed the adapter state shared across layers after other "
                         "layers were merged; this method cannot be merged one layer at a time")
    try:
        stored = layers.to_storage(host.base_layer, host.merged_weight()).contiguous()
    finally:
        # the host and its update point at each other: left to the cycle collector, several
        # layers' base weights would stay alive at once; drop them now
        for name in list(host.base_layer._parameters):
            host.base_layer._parameters[name] = None
        host.update = host.reparam = None
    if safe and stored.is_floating_point() and not torch.isfinite(stored).all():
        raise MergeError(f"merging '{plan.path}' gives NaN or Inf (fp16/bf16 overflow or a diverged adapter); "
                         "nothing was written")
    return stored


def merge_checkpoint(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     safe: bool = True, overwrite: bool = False, verify_base: bool = True,
                     registry: Registry | None = None, dtype: torch.dtype | None = None,
                     progress: Progress = SILENT) -> Path:
    """Fold the adapter in ``adapter_dir`` into the checkpoint ``base_dir``; write ``out_dir``.

    base_dir: a transformers folder with ``config.json`` and ``model.safetensors`` or shards
        plus ``model.safetensors.index.json``.
    adapter_dir: a modapt adapter (``modapt.save``) or a PEFT adapter folder.
    safe: refuse a merged tensor with NaN or Inf (on by default).
    verify_base: check the base fingerprint recorded in a modapt adapter against the shards.
    progress: stage reports (``modapt merge`` prints them on stderr); silent by default.

    Returns ``out_dir``. The output has the same shard files and index, the merged tensors in
    their original dtype and layout, every other tensor byte for byte, and the other files of
    ``base_dir`` (config, tokenizer, generation config). On any error nothing is left behind.

    A checkpoint saved quantized (``quantization_config`` in its config) is merged by
    :func:`merge_quantized_checkpoint` instead: the output is dequantized, in ``dtype``
    (default: the quantization's compute dtype). ``dtype`` is for quantized bases only.
    """
    registry = registry or default_registry()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    refuse_overlap(out_dir, {"base": base_dir, "adapter": Path(adapter_dir)})
    clean_stale(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise MergeError(f"{out_dir} exists and is not a folder; choose another output folder")
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir} exists; choose another output folder (or pass overwrite)")
    if _quantization_config(base_dir) is not None:
        return merge_quantized_checkpoint(base_dir, adapter_dir, out_dir, safe=safe, overwrite=overwrite,
                                          verify_base=verify_base, registry=registry, dtype=dtype)
    if dtype is not None:
        raise MergeError(f"{base_dir} is not quantized: the merged tensors keep the checkpoint's dtype "
                         "(--dtype applies to quantized bases)")
    progress.note(f"reading {base_dir} and {adapter_dir}")
    ckpt = Checkpoint.open(base_dir)
    source = read_adapter(adapter_dir, registry, verify_base=verify_base)
    check_mergeable(source.recipe, registry)
    model = skeleton(base_dir)
    plans, saved = plan_layers(model, source, registry)
    model._modapt_merge_shared = build_shared(model, plans, registry)  # checked after each layer's build
    if source.shared:
        from .peft_format import check_shared

        check_shared(model, source.shared, source.directory)

    touched: dict[str, Callable[[], torch.Tensor]] = {}
    groups = {name: g for g in tie_groups(model) for name in g}

    def stored_key(key: str) -> str:
        """``key``, or the tied weight sharing its tensor when the checkpoint saved the pair once."""
        if key in ckpt:
            return key
        for other in groups.get(key, []):
            if other in ckpt:
                return other
        raise CheckpointError(f"{base_dir}: tensor '{key}' is not in the checkpoint (nor a tied weight of it)")

    def locate(key: str) -> TensorEntry:
        return ckpt.entries[stored_key(key)]

    def get(key: str) -> torch.Tensor:
        return ckpt.get(stored_key(key))

    for plan in plans:
        locate(plan.key)  # a missing base tensor is reported now, before anything is written
        touched[plan.key] = (lambda p=plan: merged_tensor(p, get, registry, safe, model))
    for path in saved:
        for name, tensor in source.tensors.items():
            if not name.startswith(path + "."):
                continue
            entry = locate(name)
            if tuple(tensor.shape) != entry.shape:
                raise MergeError(f"modules_to_save tensor '{name}' has shape {list(tensor.shape)}, the base stores "
                                 f"{list(entry.shape)}")
            if name in touched:
                raise MergeError(f"'{name}' is both adapted and in modules_to_save")
            touched[name] = (lambda n=name, t=tensor, e=entry: saved_tensor(n, t, e, safe))

    if verify_base and source.fingerprint is not None:
        with progress.stage("verification of the base fingerprint"):
            _verify_fingerprint(source, plans, get)

    untie = _untie_plan(model, base_dir, ckpt, touched, groups)
    by_file: dict[str, dict] = {name: {} for name in ckpt.files}
    additions: dict[str, list] = {name: [] for name in ckpt.files}
    for key, fn in touched.items():
        if key in ckpt:
            by_file[ckpt.entries[key].file][key] = fn
    for key in untie:  # a tied weight saved once gets its own tensor, in its partner's shard
        partner = stored_key(key)
        entry = ckpt.entries[partner]
        fn = touched.get(key) or (lambda k=partner: ckpt.get(k))
        additions[entry.file].append((key, entry, fn))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # the PID in the name tells the next run whether the writer is dead (see clean_stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".partial", dir=out_dir.parent))
    try:
        for i, name in enumerate(ckpt.files, 1):
            progress.step("shard", i, len(ckpt.files), f"{name} ({len(by_file[name])} merged tensors)")
            write_shard(base_dir / name, ckpt.headers[name], tmp / name, by_file[name], additions[name])
            _boundary(f"shard:{name}")
        if ckpt.index is not None:
            index = copy.deepcopy(ckpt.index)
            for name, added in additions.items():
                for key, entry, _ in added:
                    index["weight_map"][key] = name
                    if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                        index["metadata"]["total_size"] += entry.end - entry.begin
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _boundary("index")
        _copy_side_files(base_dir, tmp, untie)
        _boundary("side-files")
        _commit(tmp, out_dir, overwrite)
        progress.note(f"saved {out_dir}")
    except BaseException:
        _remove(tmp)
        raise
    return out_dir


def read_base_config(base_dir: Path) -> dict:
    """The base's ``config.json`` as a dict, read under :mod:`modapt.untrusted`'s size and depth limits.

    A downloaded checkpoint's config can be nested deep enough to make ``json.loads`` raise
    ``RecursionError``, or be gigabytes long: either is a one-line :class:`CheckpointError`
    naming the file, raised before transformers parses it.
    """
    from modapt.untrusted import UntrustedFileError, read_json

    path = Path(base_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{base_dir}: no config.json (a transformers checkpoint folder is expected)")
    try:
        config = read_json(path)
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object (a transformers config is expected)")
    return config


def _quantization_config(base_dir: Path) -> dict | None:
    if not (base_dir / "config.json").is_file():
        return None  # the streaming path reports the missing config with the rest of the folder
    qconfig = read_base_config(base_dir).get("quantization_config")
    return qconfig if isinstance(qconfig, dict) and qconfig else None


def merge_quantized_checkpoint(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                               out_dir: str | os.PathLike, *, safe: bool = True, overwrite: bool = False,
                               verify_base: bool = True, registry: Registry | None = None,
                               dtype: torch.dtype | None = None) -> Path:
    """Merge into a checkpoint saved quantized (bitsandbytes 4/8-bit); write a dequantized one.

    The packed shards cannot be rewritten in place (W* is not quantized), so the model is
    loaded whole, quantized as saved (a 4-bit checkpoint is about a quarter of the float one),
    on the GPU when there is one: :func:`modapt.load` (fingerprint over the packed tensors and
    their quantization state), :func:`modapt.merge`, every remaining quantized layer
    dequantized (:func:`modapt.quantized.dequantize_model`), ``save_pretrained`` in ``dtype``
    (default: ``bnb_4bit_compute_dtype``, else the config's dtype, else float32). The output
    config has no ``quantization_config``: plain transformers loads it. Re-quantizing is
    loading it again with a ``BitsAndBytesConfig``.
    """
    import transformers
    from modapt.quantized import EXTRA, dequantize_model

    registry = registry or default_registry()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir} exists; choose another output folder (or pass overwrite)")
    source = read_adapter(adapter_dir, registry, verify_base=False)  # modapt.load below checks it
    check_mergeable(source.recipe, registry)
    qconfig = _quantization_config(base_dir) or {}
    config = read_base_config(base_dir)
    if dtype is None:
        name = (qconfig.get("bnb_4bit_compute_dtype") or config.get("dtype") or config.get("torch_dtype")
                or "float32")
        dtype = getattr(torch, str(name).removeprefix("torch."), torch.float32)
    names = config.get("architectures") or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise CheckpointError(f"{base_dir}/config.json: 'architectures' ({names}) names no class of this "
                              f"transformers ({transformers.__version__})")
    if qconfig.get("quant_method") == "bitsandbytes":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise MergeError(f"{base_dir} is saved quantized by bitsandbytes: pip install '{EXTRA}'") from None
    device_map = {"": 0} if torch.cuda.is_available() else "cpu"
    try:
        model = cls.from_pretrained(base_dir, device_map=device_map, dtype=dtype)
    except Exception as exc:
        raise CheckpointError(f"{base_dir}: transformers cannot load this quantized checkpoint: {exc}") from None
    modapt.load(model, source.directory, registry=registry, verify_base=verify_base)
    modapt.merge(model)  # refuses NaN/Inf before any layer changes
    dequantize_model(model, dtype)
    if safe and not all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point()):
        raise MergeError(f"merging into {base_dir} gives NaN or Inf in {dtype}; nothing was written")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".partial", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        for path in sorted(base_dir.iterdir()):  # tokenizer and other side files the save did not write
            if path.is_file() and not (tmp / path.name).exists() and path.name != INDEX_NAME \
                    and not path.name.endswith(SKIPPED_SUFFIXES) and path.name not in PICKLE_WEIGHTS:
                shutil.copy2(path, tmp / path.name)
        _commit(tmp, out_dir, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    return out_dir


def saved_tensor(name: str, tensor: torch.Tensor, entry: TensorEntry, safe: bool) -> torch.Tensor:
    """A ``modules_to_save`` tensor in the checkpoint's dtype; with ``safe``, refused when not finite."""
    stored = tensor.detach().to(entry.torch_dtype).contiguous()
    if safe and stored.is_floating_point() and not torch.isfinite(stored).all():
        raise MergeError(f"modules_to_save tensor '{name}' holds NaN or Inf (a diverged adapter, or fp16/bf16 "
                         "overflow); nothing was written")
    return stored


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def refuse_overlap(out_dir: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is, contains or lies inside an input folder (links resolved).

    ``--overwrite`` removes the old output: with ``--out`` = the folder holding the base and
    the adapter, that would delete both (issue 41). Refused with or without ``overwrite``.
    """
    out = _real(out_dir)
    for role, path in inputs.items():
        inp = _real(path)
        if out == inp:
            relation = "is"
        elif inp.is_relative_to(out):
            relation = "contains"
        elif out.is_relative_to(inp):
            relation = "lies inside"
        else:
            continue
        raise MergeError(f"the output folder {out_dir} {relation} the {role} folder {path}; modapt never writes "
                         "over its inputs: choose an output folder outside both")


_STALE = re.compile(r"(?P<pid>\d+)\.[^/]*\.partial|old-(?P<old>\d+)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or a number no process has): leave it alone
    return True


def clean_stale(out_dir: Path) -> list[str]:
    """Remove what killed merges into ``out_dir`` left beside it; returns the names removed.

    ``.OUT.PID.*.partial`` (an unfinished output) and ``.OUT.old-PID`` (a replaced output not yet
    deleted) are removed when process PID is dead; live merges' folders are left alone. When
    ``out_dir`` itself is missing and a dead ``.OUT.old-PID`` exists, the kill came between the
    two renames of the fallback commit: that folder is the previous output, whole, and is moved
    back to ``out_dir`` instead.
    """
    parent = out_dir.parent
    prefix = f".{out_dir.name}."
    removed: list[str] = []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        if not entry.name.startswith(prefix):
            continue
        match = _STALE.fullmatch(entry.name[len(prefix):])
        if match is None:
            continue
        pid = int(match["pid"] or match["old"])
        if _alive(pid):
            continue
        if match["old"] and not (out_dir.exists() or out_dir.is_symlink()):
            os.rename(entry, out_dir)  # roll back: the previous output comes back whole
            continue
        _remove(entry)
        removed.append(entry.name)
    return removed


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or the filesystem cannot (the caller falls back).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _verify_fingerprint(source: AdapterSource, plans: list[LayerPlan], get) -> None:
    expected = source.fingerprint
    keys = {p.key for p in plans}
    if set(expected) != keys:
        odd = sorted(set(expected) ^ keys)[0]
        raise MergeError(f"{source.directory}: the fingerprint covers other tensors than the recipe adapts here "
                         f"(first: '{odd}'): an adapter for another model?")
    try:
        _, actual = fingerprint(expected.keys(), get)
    except KeyError as exc:
        raise MergeError(f"base tensor {exc} is missing") from None
    problem = first_mismatch(expected, actual)
    if problem:
        way_out = "" if "verify_base=False" in problem else \
            " (corrupted or another model; verify_base=False / --no-verify-base merges anyway)"
        raise MergeError(f"the base checkpoint is not the one the adapter was trained on: {problem}{way_out}")


def _untie_plan(model, base_dir: Path, ckpt: Checkpoint, touched: dict, groups: dict) -> list[str]:
    """Keys absent from the checkpoint (saved once because tied) that must now be written apart.

    When one weight of a tied group changes, the others keep W0 (that is what the adapted
    model computes: the adapter wraps one module, the tied head reads the same W0), so the
    group is untied: each member gets its own tensor and ``tie_word_embeddings`` is set to
    false in the copied config. A tie that this flag does not control is refused.
    """
    broken = {tuple(g) for key in touched for g in [groups.get(key)] if g}
    if not broken:
        return []
    untied = skeleton(base_dir, {"tie_word_embeddings": False})
    still = {tuple(g) for g in tie_groups(untied)}
    for group in broken:
        if group in still:
            raise MergeError(f"{', '.join(group)} share one tensor and the adapter changes "
                             f"{', '.join(k for k in group if k in touched)}; this tie is not controlled by "
                             "tie_word_embeddings, so the merged checkpoint cannot keep them apart")
    return [key for group in broken for key in group if key not in ckpt]


def _copy_side_files(base_dir: Path, out: Path, untie: list[str]) -> None:
    for path in sorted(base_dir.iterdir()):
        if not (path.is_file() or path.is_symlink()) or path.name == INDEX_NAME or path.name in PICKLE_WEIGHTS:
            continue
        if path.name.endswith(SKIPPED_SUFFIXES) or path.name.startswith("pytorch_model"):
            continue
        if path.is_symlink():
            # copy the link, never the bytes behind it (module docstring); absolute, so it does not dangle
            os.symlink(os.path.realpath(path), out / path.name)
            continue
        shutil.copy2(path, out / path.name)
    if untie:
        config = read_base_config(base_dir)
        config["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Put the finished folder in place: an atomic exchange with an old one, else two renames."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(tmp, out_dir)
        _boundary("renamed")
        return
    if not overwrite:
        raise MergeError(f"{out_dir} appeared during the merge; the result is not written")
    if _exchange(tmp, out_dir):
        _boundary("exchanged")
        _remove(tmp)  # it now holds the old output; a kill here leaves a stale .partial the next run removes
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.rename(out_dir, old)
    _boundary("moved-aside")  # a kill here: no out_dir, the old one whole aside; clean_stale moves it back
    os.rename(tmp, out_dir)
    _boundary("renamed")
    _remove(old)
