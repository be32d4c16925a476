"""PEFT's adapter format, both ways: ``load_peft(model, dir)`` and ``save_peft(model, dir)``.

A PEFT adapter folder is ``adapter_config.json`` (``peft_type`` and PEFT's options) plus
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.<key>`` (no adapter
name). This module knows PEFT's format; it knows modapt methods only through the
:class:`modapt.PeftFormat` each method declares in ``Method.peft`` (its fields say what each
part of the format is). LoRA lives in the core, which declares none, so its format is kept
here; ``additive`` is PEFT's plain form and needs none.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modapt
from modapt import AdapterLoadError, PeftFormat
from modapt.persistence import full_tensor
from modapt.untrusted import UntrustedFileError, read_json
from modapt.registry import Registry, default_registry
from modapt.targets import regex_problem

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: LoRA is the core's reference method and declares no PEFT format; this is its declaration.
LORA_PEFT = PeftFormat(
    peft_type="LORA",
    keys={"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight"},
    embedding_keys={"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"},
    options={"r": "r", "lora_alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora"},
    patterns={"r": "rank_pattern", "lora_alpha": "alpha_pattern"},
)
FALLBACK = {"lora": LORA_PEFT}

# PEFT options that change what the adapter computes; a file using one is refused unless an
# installed method's declaration selects it (DoRA's use_dora)
UNSUPPORTED_FLAGS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "layer_replication", "target_parameters",
                     "trainable_token_indices", "alora_invocation_tokens", "layers_to_transform")
# PEFT config fields not written by save_peft are left to PEFT's defaults


class PeftFormatError(AdapterLoadError):
    """A PEFT adapter folder that modapt cannot read, or a modapt adapter PEFT cannot express."""


def declaration(method) -> PeftFormat | None:
    """The PEFT format of a registered method (its own, or the one kept here), or ``None``."""
    return method.peft if method.peft is not None else FALLBACK.get(method.name)


def file_keys(decl: PeftFormat | None, kind: str | None) -> dict[str, str]:
    """modapt own key -> PEFT file key for a layer of ``kind`` (``"embedding"`` or other); none without a format."""
    return {} if decl is None else decl.file_keys(kind)


def pattern_value(patterns: dict | None, path: str, default):
    """A per-layer value from a PEFT pattern field ({pattern: value}), matched as PEFT matches."""
    for key, value in (patterns or {}).items():
        problem = regex_problem(key)  # a stranger's config: refuse what does not parse or backtracks for ever
        if problem:
            raise PeftFormatError(f"PEFT pattern key {key!r}: {problem}")
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


# --------------------------------------------------------------------------------- reading
def _methods_with(registry: Registry, family: str):
    for name, method in sorted(registry.methods.items()):
        if method.family == family:
            decl = declaration(method)
            if decl:
                yield name, decl


def _selected(decl: PeftFormat, config: dict) -> bool:
    return all(config.get(k) == v for k, v in decl.config.items())


def read_peft_adapter(directory: str | os.PathLike, registry: Registry | None = None
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(modapt recipe dict, tensors under modapt's names) for the PEFT adapter in ``directory``.

    Targets are the exact module paths PEFT adapted (read from the tensor names); layers
    whose options differ (PEFT's rank_pattern/alpha_pattern) get separate adapter entries.
    """
    from safetensors.torch import load_file

    registry = registry or default_registry()
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise PeftFormatError(f"{directory}: no {CONFIG_NAME}")
    try:
        config = read_json(config_path)
    except UntrustedFileError as exc:
        raise PeftFormatError(str(exc)) from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{config_path}: expected a JSON object")
    peft_type = config.get("peft_type")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        bins = [n for n in ("adapter_model.bin",) if (directory / n).exists()]
        raise PeftFormatError(f"{directory}: no {WEIGHTS_NAME}" + (
            " (adapter_model.bin found: pickle files are never loaded; re-save with safe_serialization=True)"
            if bins else ""))
    try:
        raw = load_file(weights)
    except Exception as exc:
        raise PeftFormatError(f"{weights}: not a readable safetensors file: {exc}") from None

    updates = [(n, d) for n, d in _methods_with(registry, "update") if d.peft_type == peft_type and _selected(d, config)]
    if not updates:
        hint = {"ADALORA": " (pip install modapt-adalora)"}.get(peft_type, "")
        raise PeftFormatError(f"{directory}: PEFT type {peft_type!r} is not read by any installed method{hint}")
    update_name, update_decl = updates[0]
    reparams = [(n, d) for n, d in _methods_with(registry, "reparam")
                if d.peft_type == peft_type and d.config and _selected(d, config)]
    reparam_name, reparam_decl = reparams[0] if reparams else (None, None)
    claimed = set(reparam_decl.config) if reparam_decl else set()
    for flag in UNSUPPORTED_FLAGS:
        if flag not in claimed and config.get(flag):
            hint = " (pip install modapt-dora)" if flag == "use_dora" else ""
            raise PeftFormatError(f"{directory}: PEFT option {flag}={config[flag]!r} is not supported by the "
                                  f"installed methods{hint}")
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{directory}: PEFT bias={config['bias']!r} trains base biases; modapt reads "
                              "bias='none' adapters only")

    prefix = update_decl.prefix
    kinds = {"embedding": {}, "other": {}}
    for kind in kinds:  # PEFT file key -> (modapt key, which kind of layer uses that name)
        kinds[kind] = {**file_keys(update_decl, kind if kind == "embedding" else None),
                       **file_keys(reparam_decl, kind if kind == "embedding" else None)}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    layer_kind: dict[str, str] = {}
    saved: dict[str, torch.Tensor] = {}
    to_save = config.get("modules_to_save") or []
    for key, tensor in raw.items():
        if not key.startswith(prefix):
            raise PeftFormatError(f"{weights}: key '{key}' does not start with PEFT's prefix '{prefix}'")
        name = key[len(prefix):]
        hit = None
        for kind in ("other", "embedding"):
            for own, peft_key in kinds[kind].items():
                if name.endswith("." + peft_key):
                    hit = (name[: -len(peft_key) - 1], own, kind)
                    break
            if hit:
                break
        if hit:
            path, own, kind = hit
            layers.setdefault(path, {})[own] = tensor
            if kind == "embedding" and kinds["embedding"][own] != kinds["other"].get(own):
                layer_kind[path] = "embedding"
            continue
        if ".base_layer." in name:  # save_embedding_layers: the unchanged base weight, not adapter state
            continue
        module = name.rpartition(".")[0]
        if any(module == m or module.endswith("." + m) for m in to_save):
            saved[name] = tensor
            continue
        raise PeftFormatError(f"{weights}: tensor '{key}' is not a key of the {peft_type} format modapt knows")

    entries: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(layers):
        kind = layer_kind.get(path, "other")
        update_opts = _options_from(update_decl, config, path, registry.method(update_name).options)
        reparam_opts = (_options_from(reparam_decl, config, path, registry.method(reparam_name).options)
                        if reparam_name else {})
        layer_tensors = layers[path]
        mask_key = update_decl.rank_pattern
        if mask_key:
            layer_tensors = _expand_rank_pattern(config, path, layer_tensors, update_decl, update_opts, mask_key)
        wanted = set(file_keys(update_decl, kind)) | set(file_keys(reparam_decl, kind))
        missing = sorted(wanted - set(layers[path]))
        if missing:
            raise PeftFormatError(f"{weights}: '{path}' has no '{missing[0]}' tensor")
        for own, tensor in layer_tensors.items():
            tensors[f"{path}.{own}"] = tensor
        signature = json.dumps([update_opts, reparam_opts], sort_keys=True)
        entry = entries.get(signature)
        if entry is None:
            update = {"method": update_name, **update_opts}
            entry = ({"method": reparam_name, **reparam_opts, "update": update} if reparam_name else dict(update))
            entry["targets"] = []
            entries[signature] = entry
        entry["targets"].append(path)
    if not entries:
        raise PeftFormatError(f"{weights}: no adapter tensors")
    tensors.update(saved)
    recipe: dict[str, Any] = {"adapter": list(entries.values())}
    if saved:
        recipe["modules_to_save"] = sorted({n.rpartition(".")[0] for n in saved})
    return recipe, tensors


def _options_from(decl: PeftFormat, config: dict, path: str, options_cls) -> dict[str, Any]:
    """A layer's modapt options from PEFT's config (JSON ints become floats where the option is a float)."""
    opts = {}
    fields = options_cls.model_fields if options_cls is not None else {}
    patterns = decl.patterns
    for own, field in decl.options.items():
        value = config.get(field)
        if own in patterns:
            value = pattern_value(config.get(patterns[own]), path, value)
        if value is None:
            continue  # PEFT's null: leave the modapt default
        if isinstance(value, int) and not isinstance(value, bool) and own in fields \
                and fields[own].annotation is float:
            value = float(value)
        opts[own] = value
    return opts


def _expand_rank_pattern(config, path, tensors, decl, opts, mask_key):
    """PEFT drops pruned AdaLoRA triplets from the file; modapt keeps init_r rows and a mask."""
    init_r = opts.get("init_r", config.get("init_r"))
    # PEFT names the pattern after its lora_E parameter, without the adapter name
    mask_list = (config.get("rank_pattern") or {}).get(f"{path}.lora_E")
    mask = torch.ones(init_r, dtype=torch.bool) if mask_list is None else torch.tensor(mask_list, dtype=torch.bool)
    if mask.numel() != init_r:
        raise PeftFormatError(f"rank_pattern of '{path}' has {mask.numel()} entries, init_r is {init_r}")
    out = {}
    kept = int(mask.sum())
    for own, tensor in tensors.items():
        axis = _rank_axis(file_keys(decl, None).get(own, own))
        if tensor.shape[axis] == init_r:
            out[own] = tensor
            continue
        if tensor.shape[axis] != kept:
            raise PeftFormatError(f"'{path}.{own}' has {tensor.shape[axis]} triplets, its rank_pattern keeps {kept}")
        shape = list(tensor.shape)
        shape[axis] = init_r
        full = torch.zeros(shape, dtype=tensor.dtype)
        index = mask.nonzero().flatten()
        full.index_copy_(axis, index, tensor)
        out[own] = full
    out[mask_key] = mask
    return out


def _rank_axis(peft_key: str) -> int:
    # PEFT's AdaLoRA (resize_state_dict_by_rank_pattern): lora_B [out, r] is cut on its columns,
    # lora_A [r, in] and lora_E [r, 1] on their rows
    return 1 if peft_key.startswith("lora_B") else 0


@torch.no_grad()
def load_peft(model: nn.Module, directory: str | os.PathLike, *, registry: Registry | None = None) -> nn.Module:
    """Apply the PEFT adapter in ``directory`` to the base ``model`` (modapt recipe, PEFT's tensors).

    The model changes only when everything fits; returns the same model, adapted.
    """
    registry = registry or default_registry()
    recipe, tensors = read_peft_adapter(directory, registry)
    modapt.apply(model, recipe, registry=registry)
    try:
        targets = modapt.adapter_state_dict(model)
        missing, extra = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
        if missing or extra:
            raise PeftFormatError(f"{directory}: " + (f"tensor for '{missing[0]}' is missing" if missing
                                                      else f"unexpected tensor '{extra[0]}'"))
        for name, target in targets.items():
            got = tensors[name]
            if tuple(got.shape) != tuple(target.shape):
                raise PeftFormatError(f"{directory}: '{name}' has shape {list(got.shape)}, this model needs "
                                      f"{list(target.shape)}")
            target.copy_(got)
    except BaseException:
        modapt.remove(model)
        raise
    return model


# --------------------------------------------------------------------------------- writing
def save_peft(model: nn.Module, directory: str | os.PathLike, *, registry: Registry | None = None) -> Path:
    """Write the model's modapt adapter as a PEFT adapter folder that ``PeftModel.from_pretrained`` reads.

    Every adapted layer must use methods that declare a PEFT format, all of one PEFT type
    (PEFT keeps one config per adapter); per-layer ranks and alphas go to PEFT's patterns.
    The folder is replaced atomically, as ``modapt.save`` does; it holds PEFT's two files only.
    """
    from modapt.atomic_folder import replace_folder

    config, blob = peft_payload(model, registry=registry)

    def write(folder: Path) -> list[str]:
        (folder / WEIGHTS_NAME).write_bytes(blob)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [WEIGHTS_NAME, CONFIG_NAME]

    return replace_folder(directory, write, owned=(CONFIG_NAME, WEIGHTS_NAME, "modapt_adapter.json",
                                                   "modapt_adapter.safetensors"))


def peft_payload(model: nn.Module, *, registry: Registry | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, Any], bytes]:
    """(PEFT ``adapter_config.json`` dict, ``adapter_model.safetensors`` bytes) for the model's adapter.

    ``tensors``: the adapter's tensors as :func:`modapt.adapter_state_dict` names them, already
    whole (``modapt.save`` passes what it gathered: under FSDP2 gathering a shard is a
    collective, and only rank 0 writes, so it must not gather again here).

    Raises :class:`PeftFormatError` when PEFT cannot express it (a method without a PEFT
    format, attachments, mixed PEFT types, per-layer values PEFT keeps once).
    """
    from safetensors.torch import save

    registry = registry or default_registry()
    state = modapt.state_of(model)
    if state.attachments:
        names = sorted({m for m, _ in state.attachments.values()})
        raise PeftFormatError(f"PEFT's LoRA/DoRA/AdaLoRA formats cannot hold {', '.join(names)} adapters")
    if not state.layers:
        raise PeftFormatError("the model has no weight adapters to save")
    all_tensors = modapt.adapter_state_dict(model) if tensors is None else tensors
    tensors = {}
    per_layer: dict[str, dict[str, Any]] = {}
    peft_type, selectors, kinds = None, None, Counter()
    rank_pattern: dict[str, list[bool]] = {}
    decls = {}
    for path, host in state.layers.items():
        update_name = host.update.method_name
        reparam_name = host.reparam.method_name
        update_decl = declaration(registry.method(update_name))
        if update_decl is None:
            raise PeftFormatError(f"'{path}' uses '{update_name}', which declares no PEFT format")
        reparam_decl = None
        if reparam_name != "additive":
            reparam_decl = declaration(registry.method(reparam_name))
            if reparam_decl is None:
                raise PeftFormatError(f"'{path}' uses the reparam '{reparam_name}', which declares no PEFT format")
            if reparam_decl.peft_type != update_decl.peft_type:
                raise PeftFormatError(f"'{path}': PEFT has no {reparam_name} over {update_name}")
        reparam_selectors = dict(reparam_decl.config) if reparam_decl else {}
        if peft_type not in (None, update_decl.peft_type) or selectors not in (None, reparam_selectors):
            raise PeftFormatError("PEFT keeps one adapter type per folder; this model mixes "
                                  f"{peft_type} and {update_decl.peft_type}"
                                  f"{'' if reparam_name == 'additive' else ' with ' + reparam_name}")
        peft_type, selectors = update_decl.peft_type, reparam_selectors
        kind = host.kind
        kinds[kind] += 1
        spec_opts = host.update.options.model_dump(mode="json")
        values = {field: spec_opts.get(own) for own, field in update_decl.options.items()}
        if reparam_decl:
            ropts = host.reparam.options.model_dump(mode="json")
            values.update({field: ropts.get(own) for own, field in reparam_decl.options.items()})
        per_layer[path] = values
        decls[path] = update_decl
        keys = {**file_keys(update_decl, kind), **file_keys(reparam_decl, kind)}
        prefix = update_decl.prefix
        layer_tensors = {k[len(path) + 1:]: v for k, v in all_tensors.items() if k.startswith(path + ".")}
        mask_key = update_decl.rank_pattern
        if mask_key:
            mask = layer_tensors.pop(mask_key).detach().to("cpu", torch.bool)
            if not bool(mask.all()):
                rank_pattern[f"{path}.{keys.get('lora_E', 'lora_E')}"] = mask.tolist()
                index = mask.nonzero().flatten()
                layer_tensors = {k: v.detach().index_select(_rank_axis(keys.get(k, k)), index.to(v.device))
                                 for k, v in layer_tensors.items()}
        for own, tensor in layer_tensors.items():
            if own not in keys:
                raise PeftFormatError(f"'{path}.{own}' has no name in PEFT's format")
            tensors[f"{prefix}{path}.{keys[own]}"] = tensor
    for path in state.modules_to_save:
        for name, param in model.get_submodule(path).named_parameters():
            tensors[f"{PREFIX}{path}.{name}"] = param
    config = _peft_config(peft_type, selectors, per_layer, decls, state, kinds, model)
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    blob = save({k: full_tensor(v).detach().to("cpu").contiguous().clone()
                 for k, v in tensors.items()}, metadata={"format": "pt"})
    return config, blob


def _peft_config(peft_type, selectors, per_layer, decls, state, kinds, model) -> dict[str, Any]:
    config: dict[str, Any] = {"peft_type": peft_type, "bias": "none", "inference_mode": True,
                              "target_modules": sorted(per_layer), "task_type": None,
                              "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
                              or None,
                              "fan_in_fan_out": kinds.most_common(1)[0][0] == "conv1d"}
    config.update(selectors)
    patterns_of = {}
    for decl in decls.values():
        for own, pattern_field in decl.patterns.items():
            patterns_of[decl.options[own]] = pattern_field
    fields = sorted({f for values in per_layer.values() for f in values})
    for field in fields:
        values = {path: per_layer[path].get(field) for path in per_layer}
        common = Counter(json.dumps(v) for v in values.values()).most_common(1)[0][0]
        config[field] = json.loads(common)
        others = {p: v for p, v in values.items() if json.dumps(v) != common}
        if others:
            if field not in patterns_of:
                raise PeftFormatError(f"PEFT keeps one '{field}' per adapter; the layers use "
                                      f"{sorted({json.dumps(v) for v in values.values()})}")
            config.setdefault(patterns_of[field], {}).update({re.escape(p): v for p, v in others.items()})
    for pattern_field in set(patterns_of.values()):
        config.setdefault(pattern_field, {})
    if state.modules_to_save:
        config["modules_to_save"] = list(state.modules_to_save)
    return config


# --------------------------------------------------------------------------------- converting
def convert_to_peft(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, base_dir: str | os.PathLike |
                    None = None, overwrite: bool = False, registry: Registry | None = None) -> Path:
    """Write the modapt adapter folder ``adapter_dir`` (any format version) as a PEFT folder ``out_dir``.

    The base is never loaded: its skeleton is built on the ``meta`` device from ``base_dir``
    (default: the ``base_model.name_or_path`` the adapter recorded, when it is a local folder)
    to learn each layer's kind, and the adapter's tensors are placed into it as they are.
    """
    from modapt import persistence
    from modapt.recipe import parse_recipe

    from .merge import skeleton

    registry = registry or default_registry()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise PeftFormatError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    adapter_dir = Path(adapter_dir)
    config = persistence.read_config(adapter_dir)
    base = base_dir or (config.get("base_model") or {}).get("name_or_path") or ""
    if not base or not (Path(base) / "config.json").is_file():
        raise PeftFormatError(f"{adapter_dir}: the base it records ({base or 'none'!s}) is not a local model folder; "
                              "pass --base MODEL_DIR (its config.json is read, never its weights)")
    if Path(out_dir).resolve() in (adapter_dir.resolve(), Path(base).resolve()):
        raise PeftFormatError(f"{out_dir}: is the adapter or the base folder itself; choose another --out")
    try:
        recipe = parse_recipe(config["recipe"], registry)
    except modapt.ModaptError as exc:
        raise PeftFormatError(f"{adapter_dir}: the saved recipe cannot be used here: {exc}") from None
    tensors = persistence.read_tensors(adapter_dir, config)
    model = skeleton(base)
    model.config._name_or_path = str(base)
    modapt.apply(model, recipe, registry=registry)
    targets = modapt.adapter_state_dict(model)
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise PeftFormatError(f"{adapter_dir}: tensor '{missing[0]}' is missing")
    model.load_state_dict({k: tensors[k] for k in targets}, strict=False, assign=True)
    payload = peft_payload(model, registry=registry)

    def write(folder: Path) -> list[str]:
        peft_config, blob = payload
        (folder / WEIGHTS_NAME).write_bytes(blob)
        (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return [WEIGHTS_NAME, CONFIG_NAME]

    from modapt.atomic_folder import replace_folder

    return replace_folder(out_dir, write, owned=(CONFIG_NAME, WEIGHTS_NAME, "modapt_adapter.json",
                                                 "modapt_adapter.safetensors"))
