"""The rules of composition, checked on a resolved recipe before any model is touched.

Every rule reads the data the method plugins declare (``family`` and
``capabilities.composes_with``) through the registry; no method name is written here. Each
refusal is a :class:`modapt.RecipeError` that names the rule and the two adapters by their key
paths in the resolved recipe (``adapter[i]``, ``adapter[i].update``: a preset's entries come
first, in the order ``modapt recipe check`` prints them).

What a recipe alone cannot tell (which modules a suffix, a ``re:`` pattern or ``all-linear``
matches in a given model, whether a named module is an attention module) is checked at apply
time: the core refuses two adapters of one group on one module and a layer of the wrong kind,
and the attention plugin (LMAM) refuses a module it cannot attach to.
"""

from __future__ import annotations

from dataclasses import dataclass

from modapt import Method, Recipe, RecipeError, Registry
from modapt.recipe import ALL_LINEAR

WEIGHT_FAMILIES = ("update", "reparam")
DEFAULT_TARGETS = "their default targets"  # both entries leave targets out and share the method's finder
CORE_DISTRIBUTION = "modapt"  # the core's own reparam (additive) is what an update alone gets


@dataclass(frozen=True)
class Entry:
    """One top-level adapter entry, as the rules see it."""

    path: str  # "adapter[i]"
    method: Method
    targets: tuple[str, ...] | None
    chain: tuple[tuple[str, Method], ...]  # (key path, method): the entry, then its update

    @property
    def group(self) -> str:
        """``weight`` for update and reparam entries (one reparam and one update per weight), else the family."""
        return "weight" if self.method.family in WEIGHT_FAMILIES else self.method.family

    @property
    def families(self) -> set[str]:
        return {m.family for _, m in self.chain}

    def label(self) -> str:
        return f"{self.path} ({' over '.join(m.name for _, m in self.chain)})"


def is_default_reparam(method: Method) -> bool:
    """The core's reparam (W0 + ΔW): writing it around an update is the same as the update alone."""
    return method.family == "reparam" and method.distribution == CORE_DISTRIBUTION


def entries_of(recipe: Recipe, registry: Registry) -> list[Entry]:
    out = []
    for i, spec in enumerate(recipe.adapters):
        path = f"adapter[{i}]"
        method = registry.method(spec.method)
        chain = [(path, method)]
        if spec.update is not None:
            chain.append((f"{path}.update", registry.method(spec.update.method)))
        out.append(Entry(path, method, spec.targets, tuple(chain)))
    return out


def check_recipe(recipe: Recipe, registry: Registry) -> None:
    """Raise :class:`RecipeError` at the first rule the recipe breaks; return ``None`` otherwise."""
    entries = entries_of(recipe, registry)

    def refuse(rule: str, message: str, path: str) -> RecipeError:
        return RecipeError(f"rule '{rule}': {message}", path=path, source=recipe.source)

    for entry in entries:
        _check_chain(entry, refuse)
    for j, later in enumerate(entries):
        for earlier in entries[:j]:
            _check_pair(earlier, later, refuse)


def _check_chain(entry: Entry, refuse) -> None:
    """A reparam over an update: both sides must declare it."""
    if len(entry.chain) < 2:
        return
    (rpath, reparam), (upath, update) = entry.chain
    if "update" not in reparam.capabilities.composes_with:
        raise refuse(
            "a reparam wraps an update",
            f"{rpath} ('{reparam.name}', a reparam) does not declare that it wraps updates "
            f"(its composes_with: {_listed(reparam)}), yet {upath} is '{update.name}'", rpath)
    if not is_default_reparam(reparam) and "reparam" not in update.capabilities.composes_with:
        raise refuse(
            "an update under a reparam",
            f"{upath} ('{update.name}', an update) does not declare that a reparam may wrap it "
            f"(its composes_with: {_listed(update)}), yet {rpath} ('{reparam.name}') wraps it; "
            f"use '{update.name}' alone (W0 + ΔW)", upath)


def _check_pair(a: Entry, b: Entry, refuse) -> None:
    if a.group != b.group:
        _check_beside(a, b, refuse)
        _check_weight_target(a, b, refuse)
        return
    shared = _shared_targets(a, b)
    if not shared:
        return
    what = DEFAULT_TARGETS if shared == [DEFAULT_TARGETS] else ", ".join(f"'{t}'" for t in shared)
    if a.group == "weight":
        reparams = [e for e in (a, b) if e.method.family == "reparam" and not is_default_reparam(e.method)]
        if len(reparams) == 2:
            raise refuse(
                "two reparams on one weight",
                f"{a.label()} and {b.label()} both target {what}; a weight has one reparam: put one update "
                "under one reparam", f"{b.path}.targets")
        raise refuse(
            "two updates on one weight without a reparam that says how",
            f"{a.label()} and {b.label()} both target {what}; a weight takes one update under one reparam "
            "(give the targets to one entry, or name other modules)", f"{b.path}.targets")
    raise refuse(
        f"one {a.group} adapter per module",
        f"{a.label()} and {b.label()} both target {what}; give them disjoint targets", f"{b.path}.targets")


def _check_beside(a: Entry, b: Entry, refuse) -> None:
    """Adapters of different groups share a model only when each side lists the other's families.

    Checked for every pair in the recipe: which modules they share is known only with the
    model, and attention, module and weight adapters of one transformer block normally do.
    """
    for x, y in ((a, b), (b, a)):
        for path, method in x.chain:
            missing = sorted(y.families - method.capabilities.composes_with)
            if missing:
                rule = {"attention": "an attention adapter beside weight adapters",
                        "module": "a module adapter beside other adapters"}.get(
                    a.group if a.group != "weight" else b.group, "adapters of different families")
                if {a.group, b.group} == {"attention", "module"}:
                    rule = "a module adapter beside an attention adapter"
                raise refuse(
                    rule,
                    f"{path} ('{method.name}', {method.family}) does not declare that it composes with "
                    f"{', '.join(missing)} (its composes_with: {_listed(method)}), and {y.label()} is "
                    f"{' and '.join(sorted(y.families))}", b.path)


def _check_weight_target(a: Entry, b: Entry, refuse) -> None:
    """An attention or module adapter never targets a module that a weight adapter adapts as a weight."""
    weight, other = (a, b) if a.group == "weight" else (b, a)
    if weight.group != "weight" or other.targets is None:
        return
    kind = "attention" if other.group == "attention" else "module"
    if ALL_LINEAR in other.targets:
        raise refuse(
            f"{other.method.name} on a non-{kind} module" if kind == "attention" else "a module adapter on a weight",
            f"{other.label()} targets '{ALL_LINEAR}', which means linear layers (weights), not {kind} modules",
            f"{other.path}.targets")
    shared = [t for t in other.targets if weight.targets is not None and t in weight.targets]
    if shared:
        what = ", ".join(f"'{t}'" for t in shared)
        rule = f"{other.method.name} on a non-attention module" if kind == "attention" else "a module adapter on a weight"
        raise refuse(
            rule,
            f"{other.label()} targets {what}, which {weight.label()} adapts as a weight (a linear layer); "
            f"{'an attention adapter targets attention modules (leave targets out to take every one)' if kind == 'attention' else 'a module adapter targets blocks'}"
            "; whether a named module really is one is checked when the adapter is applied",
            f"{other.path}.targets")


def _shared_targets(a: Entry, b: Entry) -> list[str]:
    """Targets both entries name literally (module matching needs the model: apply time)."""
    if a.targets is None or b.targets is None:
        if a.targets is None and b.targets is None and a.method.default_targets is not None \
                and a.method.default_targets is b.method.default_targets:
            return [DEFAULT_TARGETS]
        return []
    return [t for t in b.targets if t in a.targets]


def _listed(method: Method) -> str:
    return ", ".join(sorted(method.capabilities.composes_with)) or "nothing"
