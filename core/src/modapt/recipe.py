"""Recipes: which adapters go where, as data (TOML, JSON, YAML or a dict).

A recipe has the list key ``adapter``; each entry names a ``method``, its options, its
``targets`` and, for a reparam, the ``update`` it wraps::

    [[adapter]]
    method = "map"
    targets = ["q_proj", "v_proj"]
    [adapter.update]
    method = "lora"
    r = 8

``preset = "adalomap"`` pulls a named composition (registered by the composers plugin), with
``[overrides.<method>]`` tables changing its options; ``modules_to_save`` lists modules
trained in full and saved with the adapter (a classification head). Validation happens here,
before any model is touched; every error names the source, the key path, the bad value and
what would be accepted.
"""

from __future__ import annotations

import copy
import json
import os
import reprlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from .errors import PluginError, RecipeError, did_you_mean
from .methods import Options
from .registry import Registry, default_registry, distribution_of
from .targets import check_regex

TOP_LEVEL_KEYS = ("adapter", "preset", "overrides", "modules_to_save")
STRUCTURE_KEYS = ("method", "targets", "update")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a megabyte is a wrong file
ALL_LINEAR = "all-linear"

# a bad value is quoted in the error, but bounded: a 500-byte YAML file with nested aliases
# expands to a list of 10^8 strings, whose full repr would exhaust memory
_REPR = reprlib.Repr()  # attributes, not keywords: Python 3.11 has no Repr(**limits)
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = 80


def _brief(value: Any) -> str:
    return _REPR.repr(value)


@dataclass(frozen=True)
class AdapterSpec:
    """One resolved adapter entry: a method with validated options, its targets, its update."""

    method: str
    options: Options
    targets: tuple[str, ...] | None = None
    update: AdapterSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every option written out (defaults included), ``None`` values left out (TOML has no null)."""
        out: dict[str, Any] = {"method": self.method}
        if self.targets is not None:
            out["targets"] = list(self.targets)
        for key, value in self.options.model_dump(mode="json").items():
            if value is not None:
                out[key] = value
        if self.update is not None:
            out["update"] = self.update.to_dict()
        return out

    def methods(self) -> list[str]:
        return [self.method] + (self.update.methods() if self.update else [])


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Equal recipes compare equal whatever file they came from."""

    adapters: tuple[AdapterSpec, ...]
    modules_to_save: tuple[str, ...] = ()
    source: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"adapter": [a.to_dict() for a in self.adapters]}
        if self.modules_to_save:
            out["modules_to_save"] = list(self.modules_to_save)
        return out

    def methods(self) -> list[str]:
        """Every method the recipe uses, nested updates included, in order."""
        return [m for a in self.adapters for m in a.methods()]


# ---------------------------------------------------------------------------- reading files
def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file into a mapping (format from the extension); errors name the file."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise RecipeError("no such recipe file", source=src)
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"file is {size} bytes; a recipe is at most {MAX_RECIPE_BYTES}", source=src)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text (byte {exc.start})", source=src) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":  # bounded: a recipe may be downloaded (modapt.untrusted)
            from .untrusted import parse_json

            data = parse_json(text, "JSON")
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise RecipeError(f"unknown recipe format '{suffix}'; accepted: .toml, .json, .yaml, .yml", source=src)
    except RecipeError:
        raise
    except Exception as exc:  # syntax errors of the three parsers
        raise RecipeError(f"cannot parse {suffix[1:].upper()}: {exc}", source=src) from None
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a table/object at the top level, got {type(data).__name__}", source=src)
    return data


def write_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write ``recipe`` as TOML, JSON or YAML (by extension); reading it back gives an equal recipe."""
    path = Path(path)
    data = recipe.to_dict()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomli_w

        text = tomli_w.dumps(data)
    elif suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    elif suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        raise RecipeError(f"unknown recipe format '{suffix}'; accepted: .toml, .json, .yaml, .yml", source=str(path))
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------- parsing
def parse_recipe(recipe: Recipe | Mapping | str | os.PathLike, registry: Registry | None = None) -> Recipe:
    """Validate a recipe (a :class:`Recipe`, a mapping, or a file path) against the installed methods."""
    if isinstance(recipe, Recipe):
        return recipe
    registry = registry or default_registry()
    source = None
    if isinstance(recipe, (str, os.PathLike)):
        source = str(recipe)
        data = read_recipe_file(recipe)
    elif isinstance(recipe, Mapping):
        data = copy.deepcopy(dict(recipe))
    else:
        raise RecipeError(f"a recipe is a mapping or a file path, got {type(recipe).__name__}")
    parser = _Parser(registry, source)
    result = parser.parse(data)
    registry.call("modapt_validate_recipe", recipe=result, registry=registry)
    return result


class _Parser:
    def __init__(self, registry: Registry, source: str | None):
        self.registry = registry
        self.source = source

    def error(self, message: str, path: str = "") -> RecipeError:
        return RecipeError(message, path=path, source=self.source)

    def parse(self, data: dict[str, Any]) -> Recipe:
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise self.error(
                    f"unknown key '{key}'{did_you_mean(str(key), TOP_LEVEL_KEYS)}; "
                    f"accepted: {', '.join(TOP_LEVEL_KEYS)}", str(key))
        entries: list[tuple[str, Any]] = []
        modules_to_save = list(self._targets(data.get("modules_to_save", []), "modules_to_save"))
        if "preset" in data:
            preset_entries, preset_save = self._expand_preset(data["preset"], data.get("overrides", {}), ())
            entries += preset_entries
            modules_to_save += [m for m in preset_save if m not in modules_to_save]
        elif "overrides" in data:
            raise self.error("'overrides' needs a 'preset' to override", "overrides")
        own = data.get("adapter", [])
        if isinstance(own, Mapping):  # a single [adapter] table instead of [[adapter]]
            own = [own]
        if not isinstance(own, list):
            raise self.error(f"expected a list of adapter tables, got {type(own).__name__}", "adapter")
        entries += [(f"adapter[{i}]", entry) for i, entry in enumerate(own)]
        if not entries:
            raise self.error("no adapters: give an [[adapter]] table or a preset", "adapter")
        adapters = tuple(self._entry(entry, path) for path, entry in entries)
        return Recipe(adapters, tuple(modules_to_save), source=self.source)

    def _names(self, value: Any, path: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(f"expected a list of non-empty strings, got {_brief(value)}", path)
        return tuple(value)

    def _targets(self, value: Any, path: str) -> tuple[str, ...]:
        """Target names; ``re:`` patterns are refused here when they could backtrack for ever."""
        names = self._names(value, path)
        for i, name in enumerate(names):
            if name.startswith("re:"):
                check_regex(name[3:], path=f"{path}[{i}]", source=self.source)
        return names

    def _expand_preset(self, name: Any, overrides: Any, seen: tuple[str, ...]):
        path = "preset"
        if not isinstance(name, str):
            raise self.error(f"expected a preset name (string), got {_brief(name)}", path)
        presets = self.registry.presets
        if not presets:
            raise self.error(
                f"preset '{name}' needs the composers plugin, which registers presets: "
                "pip install modapt-composers", path)
        if name in seen:
            raise self.error(f"preset cycle: {' -> '.join(seen + (name,))}", path)
        if name not in presets:
            raise self.error(
                f"unknown preset '{name}'{did_you_mean(name, presets)}; installed: {', '.join(sorted(presets))}",
                path)
        preset = presets[name]
        data = copy.deepcopy(preset.recipe)
        missing = sorted({m for m in _methods_in(data) if m not in self.registry.methods})
        if missing:
            dists = sorted({distribution_of(m) for m in missing})
            raise self.error(
                f"preset '{name}' needs the methods {', '.join(missing)}, which are not installed; "
                f"install {', '.join(dists)}", path)
        if not isinstance(overrides, Mapping):
            raise self.error(f"expected a table of method names, got {_brief(overrides)}", "overrides")
        entries: list[tuple[str, Any]] = []
        if "preset" in data:
            inner, _ = self._expand_preset(data["preset"], {}, seen + (name,))
            entries += inner
        entries += [(f"preset '{name}'.adapter[{i}]", e) for i, e in enumerate(data.get("adapter", []))]
        used = set()
        for _, entry in entries:
            for table in _entry_tables(entry):
                extra = overrides.get(table.get("method"))
                if extra is not None:
                    if not isinstance(extra, Mapping):
                        raise self.error(f"expected a table of options, got {_brief(extra)}",
                                         f"overrides.{table['method']}")
                    table.update(copy.deepcopy(dict(extra)))
                    used.add(table.get("method"))
        for method in overrides:
            if method not in used:
                methods = sorted({t.get("method") for _, e in entries for t in _entry_tables(e)})
                raise self.error(
                    f"preset '{name}' has no adapter with method '{method}'; its methods: {', '.join(methods)}",
                    f"overrides.{method}")
        return entries, list(data.get("modules_to_save", []))

    def _entry(self, entry: Any, path: str, parent: str | None = None) -> AdapterSpec:
        if not isinstance(entry, Mapping):
            raise self.error(f"expected an adapter table, got {_brief(entry)}", path)
        entry = dict(entry)
        name = entry.pop("method", None)
        if name is None:
            raise self.error("missing key 'method'", path)
        if not isinstance(name, str):
            raise self.error(f"expected a method name (string), got {_brief(name)}", f"{path}.method")
        try:
            method = self.registry.method(name)
        except PluginError as exc:
            raise self.error(str(exc), f"{path}.method") from None
        family = method.family
        update_raw = entry.pop("update", None)
        targets_raw = entry.pop("targets", None)
        if parent is not None:
            if family != "update":
                raise self.error(
                    f"'{name}' is a {family} method; the 'update' of '{parent}' must be an update method "
                    f"({', '.join(self._family('update'))})", f"{path}.method")
            if targets_raw is not None:
                raise self.error("an update takes its targets from the reparam around it", f"{path}.targets")
            if update_raw is not None:
                raise self.error("an update cannot wrap another update", f"{path}.update")
        targets = None if targets_raw is None else self._targets(targets_raw, f"{path}.targets")
        if parent is None and targets is None and method.default_targets is None:
            raise self.error(
                "missing key 'targets' (module-name suffixes, 're:' regular expressions, module class names, "
                f"or '{ALL_LINEAR}')", path)
        options = self._options(method, entry, path)
        update = None
        if family == "reparam":
            if update_raw is None:
                default = method.default_update
                if default is None:
                    raise self.error(
                        f"'{name}' is a reparam and needs an 'update' table (e.g. method = \"lora\"); "
                        f"installed updates: {', '.join(self._family('update'))}", path)
                update_raw = dict(default)
            update = self._entry(update_raw, f"{path}.update", parent=name)
        elif update_raw is not None:
            raise self.error(f"'{name}' is a {family} method and takes no 'update'", f"{path}.update")
        return AdapterSpec(name, options, targets, update)

    def _family(self, family: str) -> list[str]:
        return sorted(n for n, m in self.registry.methods.items() if m.family == family)

    def _options(self, method, values: dict[str, Any], path: str) -> Options:
        fields = method.options.model_fields
        for key in values:
            if key not in fields:
                accepted = ", ".join(list(STRUCTURE_KEYS) + list(fields))
                raise self.error(
                    f"unknown key '{key}' for method '{method.name}'{did_you_mean(str(key), fields)}; "
                    f"accepted: {accepted}", f"{path}.{key}")
        try:
            return method.options.model_validate(values)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            got = first.get("input")
            message = f"{first['msg']} (got {_brief(got)})"
            if first["type"] == "missing" and path.startswith("preset "):
                # a preset cannot know run-specific values (AdaLoRA's total_step): say where they go
                message = f"{first['msg']}; give it with [overrides.{method.name}] {loc} = ..."
            raise self.error(message, f"{path}.{loc}" if loc else path) from None


def _entry_tables(entry: Any):
    """The adapter table and its nested update table, when they are tables."""
    if isinstance(entry, dict):
        yield entry
        if isinstance(entry.get("update"), dict):
            yield entry["update"]


def _methods_in(data: Mapping) -> list[str]:
    return [t["method"] for e in data.get("adapter", []) for t in _entry_tables(e) if "method" in t]
