"""Putting adapters on a model and taking them off: apply, merge, unmerge, remove.

``apply`` mutates and returns the same model object (no wrapper around the model). What it
did is kept on the model as ``model.modapt_state`` (an :class:`AdapterState`), which
``merge``, ``save`` and the training hooks read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import layers, named, quantized, shared
from . import targets as targets_mod
from .adapted_layer import AdaptedLayer
from .attachment import Attachment
from .errors import ModaptError, PluginError, RecipeError, StateError, TargetError
from .recipe import AdapterSpec, Recipe, parse_recipe
from .registry import Registry, default_registry
from .update import Additive

STATE_ATTR = "modapt_state"
WEIGHT_FAMILIES = ("update", "reparam")


@dataclass
class AdapterState:
    """What ``apply`` did to a model.

    layers: module path -> the :class:`AdaptedLayer` now at that path.
    attachments: module path -> (method name, :class:`Attachment`) for attention/module adapters.
    base_keys: module path -> state-dict key of the base weight the adapter touches, as the
        unadapted model names it (``model.layers.0.self_attn.q_proj.weight``); the fingerprint
        is computed over these.
    modules_to_save: module paths trained in full and saved with the adapter.
    requires_grad: the base model's ``requires_grad`` flags before ``apply`` (``remove`` restores them).
    unloaded: ``merge(unload=True)`` folded and dropped the weight adapters.
    """

    recipe: Recipe
    layers: dict[str, AdaptedLayer] = field(default_factory=dict)
    attachments: dict[str, tuple[str, Attachment]] = field(default_factory=dict)
    base_keys: dict[str, str] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    unloaded: bool = False
    name: str = "default"


def state_of(model: nn.Module) -> AdapterState:
    """The :class:`AdapterState` of a model prepared by :func:`apply`; a clear error otherwise."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise StateError(f"{type(model).__name__} has no modapt adapters (call modapt.apply first)")
    return state


def is_adapted(model: nn.Module) -> bool:
    return model.__dict__.get(STATE_ATTR) is not None


def apply(model: nn.Module, recipe: Recipe | dict | str, name: str = "default", *,
          registry: Registry | None = None, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Adapt ``model`` in place as ``recipe`` says and return the same object.

    Every adapted layer is replaced, at the same attribute path, by an :class:`AdaptedLayer`
    keeping the original as ``base_layer``. The base model is frozen; only adapter parameters
    (and ``modules_to_save``) are trainable afterwards. Targets are resolved and checked for
    every entry before the model is changed; if building an adapter fails, the model is
    restored and the error raised.

    autocast_adapter_dtype: as PEFT's option of the same name: adapter parameters of a
        float16/bfloat16 base are kept in float32 (MAP's scalars and AdaLoRA's scores need
        the precision); otherwise they take the base weight's dtype.
    name: the adapter's name. The first adapter of a model has today's flat parameter names;
        a further one (a new name on an adapted model) is added beside it, inactive until
        ``set_active`` (see :mod:`modapt.named`); a name the model holds is an error.
    """
    registry = registry or default_registry()
    recipe = parse_recipe(recipe, registry)
    if is_adapted(model):
        if state_of(model).unloaded:
            raise StateError("the weight adapters of this model were merged and unloaded; "
                             "modapt.remove(model) first to start over")
        named.add(model, recipe, name, registry, autocast_adapter_dtype)
        return model
    model.__dict__.pop(named.NAMED_ATTR, None)  # left by a model whose adapters were all merged away
    plan = plan_targets(model, recipe, registry)
    state = AdapterState(recipe, requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
                         name=name)
    model.__dict__[STATE_ATTR] = state
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        with shared.applying(model):  # methods may register cross-layer state (modapt.shared)
            for path, entry_path, spec in plan:
                _build(model, state, path, entry_path, spec, registry, autocast_adapter_dtype)
        for path in _modules_to_save(model, recipe):
            state.modules_to_save.append(path)
            for param in model.get_submodule(path).parameters():
                param.requires_grad_(True)
    except BaseException:
        remove(model)
        raise
    return model


def plan_targets(model: nn.Module, recipe: Recipe, registry: Registry) -> list[tuple[str, str, AdapterSpec]]:
    """(module path, recipe key path, spec) for every module to adapt; nothing is changed yet.

    Public: the streaming merge resolves targets on a meta-device skeleton with it.
    """
    plan: list[tuple[str, str, AdapterSpec]] = []
    owner: dict[str, tuple[str, str]] = {}  # module path -> (entry path, family group)
    for i, spec in enumerate(recipe.adapters):
        entry_path = f"adapter[{i}]"
        method = registry.method(spec.method)
        if spec.targets is not None:
            paths = targets_mod.match_targets(model, spec.targets, path=f"{entry_path}.targets", source=recipe.source)
        else:
            paths = list(method.default_targets(model))
            if not paths:
                raise TargetError(f"'{spec.method}' found nothing to adapt in {type(model).__name__}",
                                  path=entry_path, source=recipe.source)
        group = "weight" if method.family in WEIGHT_FAMILIES else method.family
        kinds = set(method.capabilities.layer_kinds)
        if spec.update is not None:
            kinds &= set(registry.method(spec.update.method).capabilities.layer_kinds)
        for path in paths:
            module = model.get_submodule(path)
            if group == "weight":
                problem = quantized.unsupported(module)
                if problem is not None:
                    raise TargetError(f"'{path}' is {problem}", path=f"{entry_path}.targets", source=recipe.source)
                kind = layers.layer_kind(module)
                if kind not in kinds:
                    names = " over ".join(spec.methods())
                    raise TargetError(
                        f"{names} adapts {', '.join(sorted(kinds))} layers; '{path}' is a {type(module).__name__}",
                        path=f"{entry_path}.targets", source=recipe.source)
            previous = owner.get(path)
            if previous is not None and previous[1] == group:
                raise RecipeError(
                    f"'{path}' is targeted by both {previous[0]} and {entry_path}; one {group} adapter per module "
                    "(wrap an update in a reparam to combine them)", path=f"{entry_path}.targets", source=recipe.source)
            owner[path] = (entry_path, group)
            plan.append((path, entry_path, spec))
    return plan


def _build(model, state, path, entry_path, spec, registry, autocast_adapter_dtype):
    method = registry.method(spec.method)
    module = model.get_submodule(path)
    before = {id(p) for p in module.parameters()} | {id(b) for b in module.buffers()}
    try:
        if method.family in WEIGHT_FAMILIES:
            host = AdaptedLayer(module)

            def place_new() -> None:
                _place(host, [p for n, p in host.named_parameters() if not n.startswith("base_layer.")],
                       [b for n, b in host.named_buffers() if not n.startswith("base_layer.")],
                       module.weight, autocast_adapter_dtype, layer=module)

            # built on the base's device (a 1B model on the GPU need not round-trip its adapters
            # through the CPU)
            with torch.device(module.weight.device):
                build_weight_adapter(host, spec, registry, place=place_new)
            host.train(module.training)  # new submodules (dropout) follow the layer's mode
            _set_submodule(model, path, host)
            state.layers[path] = host
            state.base_keys[path] = f"{path}.weight"
        else:
            attachment = method.build(module, spec.options, model)
            module.train(module.training)  # new submodules follow the module's mode
            new_params = [p for p in module.parameters() if id(p) not in before]
            new_buffers = [b for b in module.buffers() if id(b) not in before]
            reference = next((p for p in module.parameters() if id(p) in before), None)
            if reference is not None:
                _place(module, new_params, new_buffers, reference, autocast_adapter_dtype)
            else:
                for p in new_params:
                    p.requires_grad_(True)
            state.attachments[path] = (spec.method, attachment)
    except ModaptError:
        raise
    except ValueError as exc:  # the method's own refusal of this layer (rank > dimension, ...)
        raise RecipeError(f"cannot adapt '{path}': {exc}", path=entry_path, source=state.recipe.source) from None
    except Exception as exc:  # a bug in a plugin: say whose, the caller restores the model
        raise PluginError(f"plugin '{method.plugin}' ({method.distribution}) failed to build '{spec.method}' on "
                          f"'{path}': {type(exc).__name__}: {exc}") from exc


def build_weight_adapter(host: AdaptedLayer, spec: AdapterSpec, registry: Registry,
                         place: Callable[[], None] | None = None) -> None:
    """Build ``spec``'s update on ``host`` and the reparam around it (``additive`` for a bare update),
    and set ``host.update`` / ``host.reparam``. ``ValueError`` from a method's build propagates.

    ``place()``, when given, runs after each build: the update's new tensors must sit where the
    base is before a reparam reads them (DoRA's magnitude init multiplies the update's factors
    with W0).
    """
    method = registry.method(spec.method)
    update_spec = spec if method.family == "update" else spec.update
    update = registry.method(update_spec.method).build(host, update_spec.options)
    update.method_name = update_spec.method
    if place is not None:
        place()
    if method.family == "reparam":
        reparam = method.build(host, spec.options, update)
        reparam.method_name = spec.method
    else:
        reparam = Additive(host, None, update)
        reparam.method_name = "additive"
    host.update, host.reparam = update, reparam
    if place is not None:
        place()


def _place(owner: nn.Module, params, buffers, reference: torch.Tensor, autocast_adapter_dtype: bool,
           layer: nn.Module | None = None) -> None:
    """Move new adapter tensors to the base's device; floating parameters to the adapter dtype.

    The adapter dtype is always floating (an int8/uint8 packed base would give tensors that
    cannot carry gradients): a quantized ``layer``'s compute dtype, else the reference's
    dtype when floating, else float32; then fp16/bf16 -> float32 under ``autocast_adapter_dtype``.
    """
    if layer is not None and layers.is_quantized(layer):
        quantized.keep_stored_format(layer)  # the fingerprinted bytes must not change under inference
        dtype = quantized.compute_dtype(layer)
    elif reference.is_floating_point():
        dtype = reference.dtype
    else:
        dtype = torch.float32
    if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(device=reference.device, dtype=dtype if p.is_floating_point() else p.dtype)
            p.requires_grad_(True)
        for b in buffers:
            b.data = b.data.to(device=reference.device)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _modules_to_save(model: nn.Module, recipe: Recipe) -> list[str]:
    if not recipe.modules_to_save:
        return []
    return targets_mod.match_targets(model, recipe.modules_to_save, path="modules_to_save", source=recipe.source)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every trainable parameter (pass ``.values()`` to an optimizer)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: adapter parameters, their extra state, modules_to_save.

    Names are exactly those of ``named_parameters()`` (extra state under ``<path>.<key>``).
    """
    state = state_of(model)
    out: dict[str, torch.Tensor] = {}
    for path, host in state.layers.items():
        for name, param in host.named_parameters():
            if not name.startswith(("base_layer.", f"{named.SLOTS}.")):
                out[f"{path}.{name}"] = param
        for key, tensor in host.update.extra_state().items():
            out[f"{path}.{key}"] = tensor
    for path in state.attachments:
        for name, param in _attachment_parameters(model, state, path):
            out[name] = param
    for path in state.modules_to_save:  # a further named adapter's copy is saved under the module's names
        for name, param in named.saved_module(model, state, path).named_parameters():
            if not name.startswith(f"{named.SLOTS}."):
                out[f"{path}.{name}"] = param
    return out


def _attachment_parameters(model, state, path):
    """Parameters an attention/module adapter added under ``path`` (those not in the base model)."""
    attachment = state.attachments[path][1]
    if attachment.switchable:  # its own tensors only (others' may share the module), single-adapter names
        yield from named.attachment_parameters(path, attachment)
        return
    module = model.get_submodule(path)
    for name, param in module.named_parameters():
        full = f"{path}.{name}"
        if full not in state.requires_grad:
            yield full, param


def merge(model: nn.Module, unload: bool = True, *, name: str | None = None) -> nn.Module:
    """Fold every mergeable adapter into the base weights; returns the same model.

    ``unload=True`` puts plain layers back at the same paths (PEFT's ``merge_and_unload``);
    ``unload=False`` keeps the wrappers in a merged state so that :func:`unmerge` restores
    the original weights bit-exactly (at the cost of one copy of each adapted weight).
    Attention and module adapters stay active (their ``Attachment.merge`` precomputes
    constants). Raises :class:`StateError` on NaN/Inf in a merged weight, before any layer
    is changed.

    ``name=``: fold that one named adapter into the base weights for good and delete it
    (the model's other adapters stay, now over W0 + ΔW_name); ``unload`` does not apply. With
    several adapters and no name, the call is refused (say which).
    """
    if name is not None:
        named.merge_named(model, name)
        return model
    if len(named.adapters(model)) > 1:
        raise StateError(f"the model holds adapters {', '.join(named.adapters(model))}: "
                         "pass name= to merge one of them")
    state = state_of(model)
    if state.unloaded:
        raise StateError("the weight adapters of this model were already merged and unloaded")
    if any(h.merged for h in state.layers.values()):
        raise StateError("the model is already merged (modapt.unmerge first)")
    _check_tied(model, state)
    merged_weights = {path: host.merged_weight() for path, host in state.layers.items()}
    for path, w in merged_weights.items():
        if not torch.isfinite(w).all():
            raise StateError(f"merging '{path}' gives NaN or Inf (fp16 overflow or a diverged adapter); "
                             "nothing was changed")
    # each W* is computed once: the check above must see all of them before any layer changes
    for path, host in state.layers.items():
        host.merge(merged_weights.pop(path))
    for _, attachment in state.attachments.values():
        attachment.merge()
    if unload:
        for path, host in list(state.layers.items()):
            _set_submodule(model, path, host.unload_merged())
        state.layers.clear()
        state.unloaded = True
        shared.drop(model)
        if not state.attachments:
            for name, param in model.named_parameters():
                param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
            del model.__dict__[STATE_ATTR]
            model.__dict__.pop(named.NAMED_ATTR, None)
    return model


def _check_tied(model: nn.Module, state: AdapterState) -> None:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None) if not isinstance(module, AdaptedLayer) else None
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    for path, host in state.layers.items():
        names = [n for n in owners.get(id(host.base_layer.weight), []) if n != f"{path}.base_layer"]
        if names:
            raise StateError(f"'{path}' shares its weight with {', '.join(names)} (tied weights); merging would "
                             "change both: untie them or do not adapt a tied layer")


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(unload=False)``: the base weights are restored bit-exactly."""
    state = state_of(model)
    if state.unloaded:
        raise StateError("merge(unload=True) dropped the adapters; there is nothing to unmerge")
    if not any(h.merged for h in state.layers.values()) and state.layers:
        raise StateError("the model is not merged")
    for host in state.layers.values():
        host.unmerge()
    for _, attachment in state.attachments.values():
        attachment.unmerge()
    return model


def remove(model: nn.Module) -> nn.Module:
    """Take every adapter off without merging: the model is the base model again (same weights,
    same ``requires_grad`` flags as before ``apply``)."""
    state = state_of(model)
    # several named adapters: every wrapped layer goes, whichever adapter it holds
    layers_ = named.hosts(model) if named.NAMED_ATTR in model.__dict__ else state.layers
    for path, host in list(layers_.items()):
        if host.merged:
            host.unmerge()
        _set_submodule(model, path, host.base_layer)
    named.detach_all(model, named.named_of(model).states.values() if named.NAMED_ATTR in model.__dict__ else [state])
    shared.drop(model)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
    del model.__dict__[STATE_ATTR]
    model.__dict__.pop(named.NAMED_ATTR, None)
    return model


def adapter_info(model: nn.Module) -> dict[str, Any]:
    """A summary for printing: adapted paths per method and parameter counts."""
    state = state_of(model)
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    return {
        "methods": state.recipe.methods(),
        "layers": len(state.layers),
        "attachments": len(state.attachments),
        "trainable": trainable,
        "total": total,
    }
