"""Several named adapters on one model: add, switch, disable, mix per row, combine, save one.

A model holding ONE adapter is exactly what :func:`modapt.apply` always made: the adapter's
tensors sit flat on each :class:`AdaptedLayer` (``q_proj.lora_A.weight``) and the layer's
forward is ``reparam(W0, update)`` with no routing (``AdaptedLayer._route is None``).

A second adapter lives in an :class:`AdapterSlot` (a holder like the layer, sharing its
base layer) under ``<path>.modapt_adapters.<name>.<key>``; the first adapter keeps its flat
names. Per layer the output of the active adapters ``a_1..a_k`` is::

    y = base(x)                                   k = 0 (disabled, or none touches the layer)
    y = reparam_a(W0, update_a)(x)                k = 1
    y = W0 x + b + sum_i ΔW_i x                   k > 1, every a_i additive

A reparam that rescales the whole weight (MAP, DoRA, LoRMA's multiplicative forms) cannot be
summed: activating it with another adapter on the same layer is refused. ``rows`` groups the
batch rows by adapter and runs each group [n_g, ...] through its own path, scattering the
outputs back into [B, ...]. Switching only rewrites per-layer lists, flags on the attachments
and ``requires_grad`` flags: O(adapter size).

Attention and module adapters (LMAM, bottleneck) take part when their :class:`Attachment`
declares ``switchable`` (see :mod:`modapt.attachment`): the core sets ``enabled`` and ``rows``
on them, and moves the tensors of a further adapter on a module that already holds one to
``<module>.modapt_adapters.<name>``. Two of them active at once on one module are refused
(each replaces what the module computes; there is no sum to take).

``modules_to_save``: a model's FIRST adapter trains the base module itself in place, as a
single-adapter model always did (no copy kept, so the base values are gone): such an adapter
holds a model alone. A FURTHER adapter's ``modules_to_save`` get a trainable copy of the
(untouched) base module at ``<path>.modapt_adapters.<name>``; the module's forward is routed
(an instance-level ``forward``) to the active adapter's copy, to the base when none, and per
row inside ``rows``. Saving that adapter writes the copy under the module's own names.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import shared
from .adapted_layer import AdaptedLayer
from .errors import StateError
from .update import Additive

NAMED_ATTR = "modapt_named"
SLOTS = "modapt_adapters"
DEFAULT_NAME = "default"


class AdapterSlot(AdaptedLayer):
    """The holder of a further named adapter on a layer: its tensors, its update and reparam.

    Shares the owner's ``base_layer`` without registering it (the base weight is named once);
    never merged on its own (``modapt.merge(name=)`` folds through the owner).
    """

    def __init__(self, owner: AdaptedLayer):
        nn.Module.__init__(self)
        self.__dict__["_owner"] = owner  # not a submodule: no cycle, no duplicate base names
        self.update = None
        self.reparam = None
        self.merged = False
        self._route = None
        self.register_buffer("_w0_backup", None, persistent=False)

    @property
    def base_layer(self) -> nn.Module:
        return self.__dict__["_owner"].base_layer

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(self.__dict__["_owner"].base_layer, name)

    def forward(self, x, *args, **kwargs):
        return self.reparam.forward(x, *args, **kwargs)


@dataclass
class Named:
    """The named adapters of a model: name -> :class:`modapt.AdapterState`, in the order added
    (the first is the one with flat parameter names), and the active names."""

    states: dict = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    disabled: int = 0
    rows: list | None = None  # [(name or None, index tensor [n_g])] inside ``rows``
    view: object = None  # the AdapterState the training hooks see (active adapters only)
    copies: dict = field(default_factory=dict)  # (name, path) -> a further adapter's modules_to_save copy


def _apply_module():
    # ``modapt.apply`` the attribute is the function; the module is needed (import cycle: late)
    import importlib
    return importlib.import_module(f"{__package__}.apply")


def _state_of(model):
    from .apply import state_of
    return state_of(model)


def named_of(model: nn.Module) -> Named:
    """The model's :class:`Named` registry, created on first use from its single adapter."""
    named = model.__dict__.get(NAMED_ATTR)
    if named is None:
        state = _state_of(model)
        named = Named(states={state.name: state}, active=[state.name])
        model.__dict__[NAMED_ATTR] = named
    return named


def adapters(model: nn.Module) -> list[str]:
    """Names of the model's adapters, in the order they were added."""
    named = model.__dict__.get(NAMED_ATTR)
    return list(named.states) if named is not None else [_state_of(model).name]


def active(model: nn.Module) -> list[str]:
    """Names of the active adapters (empty inside :func:`disabled`)."""
    named = model.__dict__.get(NAMED_ATTR)
    if named is None:
        return [_state_of(model).name]
    return [] if named.disabled else list(named.active)


def check_name(model: nn.Module, name: str) -> None:
    """Raise :class:`StateError` for a name the model does not hold, with a did-you-mean."""
    names = adapters(model)
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise StateError(f"the model has no adapter named '{name}' (it has {', '.join(names)}){hint}")


def state_named(model: nn.Module, name: str | None):
    """The :class:`AdapterState` of adapter ``name`` (``None``: the only adapter)."""
    if name is None:
        names = adapters(model)
        if len(names) > 1:
            raise StateError(f"the model holds adapters {', '.join(names)}: pass name= to say which")
        return _state_of(model)
    check_name(model, name)
    named = model.__dict__.get(NAMED_ATTR)
    return named.states[name] if named is not None else _state_of(model)


def hosts(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Module path -> the :class:`AdaptedLayer` at that path (every adapter's layers)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, AdaptedLayer) and not isinstance(m, AdapterSlot)}


def _holders(model: nn.Module, names: Sequence[str]) -> dict[str, list[tuple[str, AdaptedLayer]]]:
    named = named_of(model)
    out: dict[str, list] = {}
    for name in names:
        for path, holder in named.states[name].layers.items():
            out.setdefault(path, []).append((name, holder))
    return out


def _check_summable(per_layer: dict[str, list]) -> None:
    for path, items in per_layer.items():
        if len(items) < 2:
            continue
        for name, holder in items:
            if not sums_with_others(holder):
                other = next(n for n, _ in items if n != name)
                raise StateError(
                    f"'{path}': adapter '{name}' ({_method_of(holder)}) rescales the whole weight and "
                    f"cannot be summed with adapter '{other}' on the same layer; activate one of them")


def _method_of(holder: AdaptedLayer) -> str:
    reparam, update = holder.reparam.method_name, holder.update.method_name
    return update if reparam == "additive" else f"{reparam}({update})"


def sums_with_others(holder: AdaptedLayer) -> bool:
    """Whether a holder's update is additive (W0 + ΔW, ΔW independent of other adapters)."""
    reparam = holder.reparam
    return isinstance(reparam, Additive) and reparam.sums_with_others


def _check_switchable(model: nn.Module, what: str) -> None:
    named = model.__dict__.get(NAMED_ATTR)
    states = named.states.values() if named is not None else [_state_of(model)]
    for state in states:
        fixed = sorted({m for m, a in state.attachments.values() if not a.switchable})
        if fixed:
            raise StateError(f"{what}: adapter '{state.name}' holds {', '.join(fixed)}, whose attachment does not "
                             "declare `switchable` (it cannot be turned off or restricted to rows)")
        in_place = [p for p in state.modules_to_save if (state.name, p) not in _copies(model)]
        if in_place:
            raise StateError(f"{what}: adapter '{state.name}' trains modules_to_save in place "
                             f"({', '.join(in_place)}), as a model's first adapter does; the base values are not "
                             "kept (load it as a further adapter beside another to keep them)")


def _check_one_attachment_per_module(model: nn.Module, names: Sequence[str]) -> None:
    named = named_of(model)
    seen: dict[int, str] = {}
    for name in names:
        for path, (_, att) in named.states[name].attachments.items():
            other = seen.setdefault(id(att.module), name)
            if other != name:
                raise StateError(f"'{path}': adapters '{other}' and '{name}' both hold an attention/module adapter "
                                 "on this module, and each replaces what it computes; activate one of them")


def _copies(model: nn.Module) -> dict:
    """(adapter name, module path) -> that adapter's copy of a modules_to_save module."""
    named = model.__dict__.get(NAMED_ATTR)
    return named.copies if named is not None else {}


def saved_module(model: nn.Module, state, path: str) -> nn.Module:
    """The module that holds adapter ``state``'s trained copy of modules_to_save ``path``."""
    return _copies(model).get((state.name, path)) or model.get_submodule(path)


def _check_one_copy_per_module(model: nn.Module, names: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for (name, path) in _copies(model):
        if name in names and seen.setdefault(path, name) != name:
            raise StateError(f"'{path}': adapters '{seen[path]}' and '{name}' both hold a modules_to_save copy of "
                             "this module, and each replaces it; activate one of them")


def _add_copies(model: nn.Module, state, recipe) -> None:
    """A trainable copy of each modules_to_save module of a further adapter (see module doc)."""
    import copy
    import types

    apply_mod = _apply_module()
    named = named_of(model)
    for path in apply_mod._modules_to_save(model, recipe):
        module = model.get_submodule(path)
        slots, forward = module._modules.pop(SLOTS, None), module.__dict__.pop("forward", None)
        try:  # the copy is of the base module alone (not of the others' copies, nor of the routing)
            twin = copy.deepcopy(module)
        finally:
            if slots is not None:
                module._modules[SLOTS] = slots
            if forward is not None:
                module.__dict__["forward"] = forward
        twin.requires_grad_(True)
        if SLOTS not in module._modules:
            module.add_module(SLOTS, nn.ModuleDict())
        module._modules[SLOTS][state.name] = twin
        if not isinstance(forward, types.MethodType) or forward.__func__ is not _forward_saved:
            module.__dict__["_modapt_forward"] = forward  # an instance forward already there (accelerate's hooks)
            module.__dict__["forward"] = types.MethodType(_forward_saved, module)  # a bound method survives deepcopy
        named.copies[(state.name, path)] = twin
        state.modules_to_save.append(path)


def _drop_copies(model: nn.Module, states) -> None:
    named = model.__dict__.get(NAMED_ATTR)
    if named is None:
        return
    for state in states:
        for path in state.modules_to_save:
            twin = named.copies.pop((state.name, path), None)
            if twin is None:
                continue
            module = model.get_submodule(path)
            slots = module._modules[SLOTS]
            del slots[state.name]
            if not len(slots):
                del module._modules[SLOTS]
            if not any(p == path for _, p in named.copies):
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_modapt_saved", None)
                before = module.__dict__.pop("_modapt_forward", None)
                if before is not None:
                    module.__dict__["forward"] = before


def _forward_saved(module: nn.Module, *args, **kwargs):
    """A modules_to_save module with copies: the active copy, the base, or per row (``rows``)."""
    plan = module.__dict__.get("_modapt_saved")
    before = module.__dict__.get("_modapt_forward")

    def base(_, *a, **k):
        return before(*a, **k) if before is not None else type(module).forward(module, *a, **k)

    if plan is None:
        return base(module, *args, **kwargs)
    if isinstance(plan, nn.Module):
        return plan(*args, **kwargs)
    x, rest = args[0], args[1:]
    out = None
    for idx, twin in plan:
        part = x.index_select(0, idx)
        y = twin(part, *rest, **kwargs) if twin is not None else base(module, part, *rest, **kwargs)
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, idx, y)
    return out


def detach_all(model: nn.Module, states) -> None:
    """Take the attachments and modules_to_save copies of ``states`` off the model."""
    detach_attachments(states)
    _drop_copies(model, states)


def attachment_parameters(path: str, att) -> Iterator[tuple[str, nn.Parameter]]:
    """(single-adapter name ``<path>.<key>...``, parameter) for each tensor of a switchable attachment."""
    holder = att.holder
    for key in att.keys():
        if holder._parameters.get(key) is not None:
            yield f"{path}.{key}", holder._parameters[key]
        elif key in holder._modules:
            for sub, param in holder._modules[key].named_parameters():
                yield f"{path}.{key}.{sub}", param


def detach_attachments(states) -> None:
    """Take the attachments of ``states`` off their modules, with the holders the core made."""
    for state in states:
        for _, att in state.attachments.values():
            att.detach()
            if att.holder is not att.module:
                slots = att.module._modules.get(SLOTS)
                for key in [k for k, v in slots.items() if v is att.holder]:
                    del slots[key]
                if not len(slots):
                    del att.module._modules[SLOTS]


def refresh(model: nn.Module) -> None:
    """Recompute every layer's route and the ``requires_grad`` flags from the active set."""
    named = named_of(model)
    names = [] if named.disabled else named.active
    per_layer = _holders(model, names)
    every = _holders(model, list(named.states))
    for path, host in hosts(model).items():
        holders = [h for _, h in per_layer.get(path, [])]
        host.__dict__["_active_holders"] = holders
        if named.rows is not None:
            by_name = {n: h for n, h in every.get(path, [])}
            host.__dict__["_row_plan"] = [(idx, [by_name[n]] if n in by_name else []) for n, idx in named.rows]
            host._route = _forward_rows
        elif len(holders) == 1 and holders[0] is host:
            host._route = None  # the single-adapter fast path
        else:
            host._route = _forward_active
    named.view = _active_view(model, named, names)
    row_index = dict(named.rows) if named.rows is not None else None
    for name, state in named.states.items():
        on = name in names
        for path, (_, att) in state.attachments.items():
            if row_index is not None:
                att.enabled, att.rows = name in row_index, row_index.get(name)
            else:
                att.enabled, att.rows = on, None
            for _, param in attachment_parameters(path, att):
                param.requires_grad_(on)
        for holder in state.layers.values():
            for key, param in _own_parameters(holder):
                param.requires_grad_(on)
        for path in state.modules_to_save:
            for param in saved_module(model, state, path).parameters():
                param.requires_grad_(on)
    for path in {p for _, p in named.copies}:
        twins = {n: t for (n, p), t in named.copies.items() if p == path}
        if named.rows is not None:  # [(row indices [n_g], copy or None: the base)]
            plan = [(idx, twins.get(n)) for n, idx in named.rows]
        else:  # set_active lets at most one active adapter hold a copy of a module
            plan = next((twins[n] for n in names if n in twins), None)
        model.get_submodule(path).__dict__["_modapt_saved"] = plan


def _active_view(model: nn.Module, named: Named, names: list[str]):
    """One AdapterState over the active adapters, each holder keyed by its own module path
    (``q_proj`` for the first adapter, ``q_proj.modapt_adapters.b`` for a further one), so that
    hooks reading ``state_of(model).layers`` (AdaLoRA's allocator, MAP's schedule) see the active
    adapters only. Rebuilt only when the active set changes (AdaLoRA caches on its identity)."""
    apply_mod = _apply_module()
    first = next(iter(named.states.values()))
    view = apply_mod.AdapterState(first.recipe, name="+".join(names), requires_grad=first.requires_grad)
    for name in names:
        for path, holder in named.states[name].layers.items():
            key = path if holder is model.get_submodule(path) else f"{path}.{SLOTS}.{name}"
            view.layers[key] = holder
            view.base_keys[key] = f"{path}.weight"
    return view


@contextlib.contextmanager
def hook_view(model: nn.Module) -> Iterator[None]:
    """Inside the block ``state_of(model)`` holds the active adapters only (training hooks);
    a model with a single adapter and no ``modapt.named`` state is left as is (no cost)."""
    named = model.__dict__.get(NAMED_ATTR)
    if named is None or named.view is None:
        yield
        return
    apply_mod = _apply_module()
    before = model.__dict__[apply_mod.STATE_ATTR]
    model.__dict__[apply_mod.STATE_ATTR] = named.view
    try:
        yield
    finally:
        model.__dict__[apply_mod.STATE_ATTR] = before


def _own_parameters(holder: nn.Module):
    for key, param in holder.named_parameters():
        if not key.startswith(("base_layer.", f"{SLOTS}.")):
            yield key, param


def _run(host: AdaptedLayer, holders: list, x, *args, **kwargs):
    if not holders:
        return host.base_layer(x, *args, **kwargs)
    if len(holders) == 1:
        return holders[0].reparam.forward(x, *args, **kwargs)
    base_out = host.base_layer(x, *args, **kwargs)
    out = base_out
    for holder in holders:
        out = out + holder.update.forward(x, base_out, host.base_layer).to(base_out.dtype)
    return out


def _forward_active(host: AdaptedLayer, x, *args, **kwargs):
    return _run(host, host.__dict__["_active_holders"], x, *args, **kwargs)


def _forward_rows(host: AdaptedLayer, x, *args, **kwargs):
    out = None
    for idx, holders in host.__dict__["_row_plan"]:
        y = _run(host, holders, x.index_select(0, idx), *args, **kwargs)
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, idx, y)
    return out


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` (one name or several) the active adapters; the others are frozen and off.

    Several adapters on one layer must all be additive (their ΔW sum); otherwise the call is
    refused naming the layer and both adapters, and nothing changes. Cost: O(adapter size).
    """
    named = named_of(model)
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        check_name(model, name)
    if len(names) != len(set(names)):
        raise StateError(f"set_active got a name twice: {names}")
    if named.disabled:
        raise StateError("set_active inside modapt.disabled(model): leave the block first")
    if any(h.merged for h in hosts(model).values()):
        raise StateError("set_active on a merged model (modapt.unmerge first)")
    _check_summable(_holders(model, names))
    _check_one_attachment_per_module(model, names)
    _check_one_copy_per_module(model, names)
    named.active = names
    refresh(model)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every adapter is off: the base model's outputs, bit for bit."""
    _check_switchable(model, "modapt.disabled")
    if any(h.merged for h in hosts(model).values()):
        raise StateError("modapt.disabled on a merged model: its base weights hold W* (modapt.unmerge first)")
    named = named_of(model)
    before = list(named.active)
    named.disabled += 1
    refresh(model)
    try:
        yield model
    finally:
        named.disabled -= 1
        named.active = [n for n in before if n in named.states]
        refresh(model)


@contextlib.contextmanager
def rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, batch row ``i`` is computed with adapter ``names[i]`` (``None``: the base).

    One forward pass: each adapted layer groups the rows by adapter, runs each group
    [n_g, ...] through that adapter alone and scatters the outputs back to [B, ...]. The
    caller's batch must have ``len(names)`` rows (checked at every adapted layer).
    """
    _check_switchable(model, "modapt.rows")
    if any(h.merged for h in hosts(model).values()):
        raise StateError("modapt.rows on a merged model (modapt.unmerge first)")
    named = named_of(model)
    names = list(names)
    for name in names:
        if name is not None:
            check_name(model, name)
    if named.rows is not None:
        raise StateError("modapt.rows blocks do not nest")
    groups: dict = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    plan = [(name, torch.tensor(idx, dtype=torch.long)) for name, idx in groups.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    plan = [(n, idx.to(device)) for n, idx in plan]
    named.rows = plan
    batch = len(names)

    def check(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        if isinstance(x, torch.Tensor) and x.shape[0] != batch:
            raise StateError(f"modapt.rows got {batch} names but the batch has {x.shape[0]} rows")

    checked = list(hosts(model).values()) + [a.module for s in named.states.values() for _, a in s.attachments.values()]
    handles = [m.register_forward_pre_hook(check, with_kwargs=True) for m in checked]
    refresh(model)
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        named.rows = None
        refresh(model)


def add(model: nn.Module, recipe, name: str, registry, autocast_adapter_dtype: bool) -> None:
    """Build ``recipe`` as a further adapter called ``name`` on an adapted model (see module doc)."""
    apply_mod = _apply_module()

    if name in adapters(model):
        raise StateError(f"the model already has an adapter named '{name}' (modapt.delete(model, '{name}') first)")
    named = named_of(model)
    if named.disabled or named.rows is not None:
        raise StateError("cannot add an adapter inside modapt.disabled or modapt.rows")
    if any(h.merged for h in hosts(model).values()):
        raise StateError(f"cannot add adapter '{name}' to a merged model (modapt.unmerge first)")
    plan = _plan_on_base(model, recipe, registry)
    # the base flags from before the first adapter, so that remove() restores them whichever stays
    state = apply_mod.AdapterState(recipe, name=name, requires_grad=_state_of(model).requires_grad)
    _check_switchable(model, f"adding adapter '{name}'")
    created: list[str] = []
    try:
        for path, entry_path, spec in plan:
            if registry.method(spec.method).family not in apply_mod.WEIGHT_FAMILIES:
                with shared.applying(model):
                    _attach(model, state, name, path, entry_path, spec, registry, autocast_adapter_dtype)
                continue
            owner = model.get_submodule(path)
            if not isinstance(owner, AdaptedLayer):
                owner = AdaptedLayer(owner)
                owner.train(owner.base_layer.training)
                apply_mod._set_submodule(model, path, owner)
                created.append(path)
            slot = AdapterSlot(owner)
            base = owner.base_layer

            def place_new(slot=slot, base=base) -> None:
                apply_mod._place(slot, [p for _, p in slot.named_parameters()], list(slot.buffers()),
                                 base.weight, autocast_adapter_dtype, layer=base)

            try:
                # the apply-time context: a method's state shared across layers (VeRA's A, B) is
                # found or made on the model, as in apply
                with torch.device(base.weight.device), shared.applying(model):
                    apply_mod.build_weight_adapter(slot, spec, registry, place=place_new)
            except ValueError as exc:
                from .errors import RecipeError
                raise RecipeError(f"cannot adapt '{path}': {exc}", path=entry_path, source=recipe.source) from None
            slot.train(owner.training)
            if SLOTS not in owner._modules:
                owner.add_module(SLOTS, nn.ModuleDict())
            owner._modules[SLOTS][name] = slot
            state.layers[path] = slot
            state.base_keys[path] = f"{path}.weight"
        _add_copies(model, state, recipe)
    except BaseException:
        detach_all(model, [state])
        _drop_layers(model, state)
        for path in created:
            apply_mod._set_submodule(model, path, model.get_submodule(path).base_layer)
        raise
    named.states[name] = state
    refresh(model)


def _attach(model: nn.Module, state, name: str, path: str, entry_path: str, spec, registry,
            autocast_adapter_dtype: bool) -> None:
    """Build an attention/module adapter of adapter ``name`` on ``path``. When the module already
    holds another adapter's attachment under the flat keys, those keys are set aside during the
    build and the new tensors moved to ``<path>.modapt_adapters.<name>`` (its ``holder``)."""
    apply_mod = _apply_module()
    from .errors import PluginError, RecipeError

    method = registry.method(spec.method)
    module = model.get_submodule(path)
    flat = [a for s in named_of(model).states.values() for _, a in s.attachments.values()
            if a.module is module and a.holder is module]
    aside = _take(module, flat[0].keys()) if flat else {}
    before = set(module._parameters) | set(module._buffers) | set(module._modules)
    try:
        attachment = method.build(module, spec.options, model)
    except ValueError as exc:
        _take(module, (set(module._parameters) | set(module._buffers) | set(module._modules)) - before)
        _put(module, aside)
        raise RecipeError(f"cannot adapt '{path}': {exc}", path=entry_path, source=state.recipe.source) from None
    except Exception as exc:
        _put(module, aside)
        raise PluginError(f"plugin '{method.plugin}' ({method.distribution}) failed to build '{spec.method}' on "
                          f"'{path}': {type(exc).__name__}: {exc}") from exc
    if not attachment.switchable:
        attachment.detach()
        _put(module, aside)
        raise StateError(f"adding adapter '{name}': {spec.method}'s attachment does not declare `switchable`, so it "
                         "cannot share a model with other named adapters")
    if flat:
        holder = nn.Module()
        _put(holder, _take(module, attachment.keys()))
        _put(module, aside)
        if SLOTS not in module._modules:
            module.add_module(SLOTS, nn.ModuleDict())
        module._modules[SLOTS][name] = holder
        attachment.holder = holder
    module.train(module.training)  # new submodules follow the module's mode
    state.attachments[path] = (spec.method, attachment)
    params = [p for _, p in attachment_parameters(path, attachment)]
    reference = next((p for n, p in module.named_parameters() if f"{path}.{n}" in state.requires_grad), None)
    if reference is not None:
        buffers = [b for k in attachment.keys() for b in _buffers_under(attachment.holder, k)]
        apply_mod._place(attachment.holder, params, buffers, reference, autocast_adapter_dtype)


def _buffers_under(holder: nn.Module, key: str) -> list[torch.Tensor]:
    if holder._buffers.get(key) is not None:
        return [holder._buffers[key]]
    return list(holder._modules[key].buffers()) if key in holder._modules else []


def _take(module: nn.Module, keys) -> dict:
    """Remove ``keys`` (parameters, buffers, children) from ``module``; what :func:`_put` puts back."""
    out = {}
    for key in keys:
        for kind in ("_parameters", "_buffers", "_modules"):
            store = getattr(module, kind)
            if key in store:
                persistent = key not in module._non_persistent_buffers_set
                module._non_persistent_buffers_set.discard(key)
                out[key] = (kind, store.pop(key), persistent)
    return out


def _put(module: nn.Module, taken: dict) -> None:
    for key, (kind, value, persistent) in taken.items():
        getattr(module, kind)[key] = value
        if kind == "_buffers" and not persistent:
            module._non_persistent_buffers_set.add(key)


def _plan_on_base(model, recipe, registry):
    """Resolve targets on the base model: the adapted layers are swapped out meanwhile."""
    apply_mod = _apply_module()

    layers = hosts(model)
    for path, host in layers.items():
        apply_mod._set_submodule(model, path, host.base_layer)
    try:
        return apply_mod.plan_targets(model, recipe, registry)
    finally:
        for path, host in layers.items():
            apply_mod._set_submodule(model, path, host)


def _drop_layers(model: nn.Module, state) -> None:
    """Take one adapter's tensors off its layers; a layer left with no adapter is unwrapped."""
    apply_mod = _apply_module()

    for path, holder in state.layers.items():
        host = model.get_submodule(path)
        if holder is host:
            keep_modules = {"base_layer", SLOTS}
            for key in [k for k in host._modules if k not in keep_modules]:
                del host._modules[key]
            host._parameters.clear()
            for key in [k for k in host._buffers if k != "_w0_backup"]:
                del host._buffers[key]
            host.update = host.reparam = None
        else:
            slots = host._modules.get(SLOTS)
            if slots is not None:
                for key in [k for k, v in slots.items() if v is holder]:
                    del slots[key]
        if host.update is None and not len(host._modules.get(SLOTS, ())):
            apply_mod._set_submodule(model, path, host.base_layer)


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (its tensors leave the model). Deleting the last adapter is
    :func:`modapt.remove`; refused inside :func:`disabled` (the block would lose its model)."""
    apply_mod = _apply_module()

    check_name(model, name)
    named = model.__dict__.get(NAMED_ATTR)
    if named is not None and (named.disabled or named.rows is not None):
        raise StateError(f"cannot delete adapter '{name}' inside modapt.disabled or modapt.rows")
    if len(adapters(model)) == 1:
        apply_mod.remove(model)
        return
    state = named.states[name]
    if any(h.merged for h in state.layers.values()):
        raise StateError(f"adapter '{name}' is merged (modapt.unmerge first)")
    detach_all(model, [state])
    _drop_layers(model, state)
    del named.states[name]
    named.active = [n for n in named.active if n != name]
    if model.__dict__[apply_mod.STATE_ATTR] is state:
        model.__dict__[apply_mod.STATE_ATTR] = next(iter(named.states.values()))
    refresh(model)


@contextlib.contextmanager
def viewing(model: nn.Module, name: str | None) -> Iterator:
    """Inside the block, ``state_of(model)`` is adapter ``name``'s state (save/load of one)."""
    apply_mod = _apply_module()

    state = state_named(model, name)
    before = model.__dict__[apply_mod.STATE_ATTR]
    model.__dict__[apply_mod.STATE_ATTR] = state
    try:
        yield state
    finally:
        model.__dict__[apply_mod.STATE_ATTR] = before


@torch.no_grad()
def merge_named(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights for good and delete it (the others stay,
    now on top of W0 + ΔW_name). NaN/Inf in any W* refuses before a weight changes."""
    from . import layers as layers_mod

    state = state_named(model, name)
    if state.attachments:
        raise StateError(f"adapter '{name}' holds attention/module adapters, which do not fold into weights")
    new = {}
    for path, holder in state.layers.items():
        if layers_mod.is_quantized(holder.base_layer):
            raise StateError(f"'{path}' is quantized: merge(name=) folds into a plain base only; nothing was changed")
        w0 = layers_mod.weight_of(holder.base_layer)
        w = holder.reparam.merged_weight(w0.float()).to(w0.dtype)
        if not torch.isfinite(w).all():
            raise StateError(f"merging '{path}' gives NaN or Inf; nothing was changed")
        new[path] = w
    for path, holder in state.layers.items():
        base = holder.base_layer
        base.weight.copy_(layers_mod.to_storage(base, new[path]))
    if len(adapters(model)) == 1:
        from .apply import remove
        remove(model)
    else:
        delete(model, name)


def _low_rank(model: nn.Module, name: str, how: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """path -> (B [out, r], A [r, in], s) of a low-rank additive adapter; refuses others with the reason."""
    state = state_named(model, name)
    if state.attachments:
        raise StateError(f"combine: adapter '{name}' holds attention/module adapters; only low-rank weight "
                         "updates (LoRA family) combine")
    out = {}
    for path, holder in state.layers.items():
        update = holder.update
        if not sums_with_others(holder):
            raise StateError(f"combine: adapter '{name}' is {holder.reparam.method_name}({update.method_name}) on "
                             f"'{path}': it rescales the whole weight, so its ΔW is not a low-rank product to combine")
        fac = update.factors()
        if fac is None:
            raise StateError(f"combine: adapter '{name}' ({update.method_name}) on '{path}' has no low-rank factors "
                             "(ΔW = B A); only the LoRA family combines")
        scale = float(getattr(update, "scaling", 1.0))
        left, right = fac
        out[path] = (left.detach() / scale, right.detach(), scale)
    return out


@torch.no_grad()
def combine(model: nn.Module, weights: dict[str, float], name: str, how: str = "svd", *,
            svd_rank: int | None = None) -> nn.Module:
    """Add adapter ``name``, a LoRA mixing low-rank adapters as PEFT's ``add_weighted_adapter``.

    With w_i the weights, s_i the scales and (B_i [out, r_i], A_i [r_i, in]) the factors
    (adapters absent from a layer are skipped there), the new LoRA has scale 1 and:

    - ``linear`` (equal ranks r): A = Σ sign(w_i s_i) √|w_i s_i| A_i, B = Σ √|w_i s_i| B_i
      (a mix of factors, not of ΔW: cross terms B_i A_j appear, as in PEFT).
    - ``cat`` (rank Σ r_i): A = [w_i s_i A_i] stacked, B = [B_i] side by side: ΔW = Σ w_i ΔW_i exactly.
    - ``svd`` (rank ``svd_rank`` or max r_i): the truncated SVD of Σ w_i ΔW_i, B = U S, A = Vh.

    Embedding LoRAs combine by the same formulas (A [r, vocab], B [dim, r], ΔW = B A as PEFT's
    ``lora_embedding_A/B``; PEFT transposes its embedding ΔW before the SVD, which is this B A).
    The new adapter is inactive until ``set_active``. Others than the LoRA family are refused.
    """
    from .apply import apply as apply_fn

    if how not in ("linear", "cat", "svd"):
        raise StateError(f"combine: how must be 'linear', 'cat' or 'svd', got {how!r}")
    if not weights:
        raise StateError("combine: no adapters given")
    if name in adapters(model):
        raise StateError(f"the model already has an adapter named '{name}'")
    parts = {n: _low_rank(model, n, how) for n in weights}
    how = "linear" if len(parts) == 1 else how  # PEFT: one adapter combines linearly
    ranks = {n: max((b.shape[1] for b, _, _ in p.values()), default=0) for n, p in parts.items()}
    if how == "linear":
        if len(set(ranks.values())) != 1:
            raise StateError(f"combine how='linear' needs adapters of one rank; got {ranks} (use 'cat' or 'svd')")
        rank = next(iter(ranks.values()))
    elif how == "cat":
        rank = sum(ranks.values())
    else:
        rank = svd_rank or max(ranks.values())
    paths = [p for p, _ in hosts(model).items() if any(p in part for part in parts.values())]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in paths:
        present = [(parts[n][path], float(w)) for n, w in weights.items() if path in parts[n]]
        if how == "linear":
            a = sum((b_a_s[1] * (1.0 if w * b_a_s[2] >= 0 else -1.0) * abs(w * b_a_s[2]) ** 0.5
                     for b_a_s, w in present))
            b = sum((b_a_s[0] * abs(w * b_a_s[2]) ** 0.5 for b_a_s, w in present))
        elif how == "cat":
            a = torch.cat([ps[1] * w * ps[2] for ps, w in present], dim=0)
            b = torch.cat([ps[0] for ps, _ in present], dim=1)
            a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
        else:
            delta = sum(w * ps[2] * (ps[0].float() @ ps[1].float()) for ps, w in present)
            u, s, vh = torch.linalg.svd(delta, full_matrices=True)
            b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
        factors[path] = (b, a)
    recipe = {"adapter": [{"method": "lora", "targets": paths, "r": rank, "lora_alpha": float(rank)}]}
    apply_fn(model, recipe, name)
    for path, (b, a) in factors.items():
        holder = named_of(model).states[name].layers[path]
        if tuple(holder.lora_A.weight.shape) != tuple(a.shape):
            delete(model, name)
            raise StateError(f"combine: '{path}': the combined factors {tuple(b.shape)} x {tuple(a.shape)} do not "
                             f"fit a LoRA of rank {rank} on this layer")
        holder.lora_A.weight.copy_(a)
        holder.lora_B.weight.copy_(b)
    return model
