"""The registry: loads plugins (lazily), validates them, and holds their methods and presets.

Plugins come from the entry-point group ``modapt`` (``MODAPT_PLUGINS=lora,map`` narrows the
set to those entry-point names) or are registered explicitly (tests, notebooks). A plugin that
fails to import, to validate or to register is recorded as *broken* with its distribution and
the reason; the others keep working.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, RecipeError, did_you_mean
from .methods import FAMILIES, Method, PeftFormat

ENTRY_POINT_GROUP = "modapt"
HOOK_PREFIX = "modapt_"


def distribution_of(method: str) -> str:
    """The distribution that provides ``method`` among this project's: ``modapt-<method>``
    (``lora``/``additive``: the core ``modapt``). Used only to name what to install in an
    error; which plugins exist is known from entry points alone, never from a list."""
    return "modapt" if method in ("lora", "additive") else f"modapt-{method}"


@dataclass
class PluginInfo:
    """One plugin as ``modapt plugins`` shows it."""

    name: str
    distribution: str
    version: str
    status: str = "ok"  # "ok" or "broken"
    error: str = ""
    methods: list[str] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)
    description: str = ""


@dataclass(frozen=True)
class Preset:
    """A named composition, registered by the composers plugin."""

    name: str
    recipe: dict[str, Any]
    citation: str
    description: str = ""
    distribution: str = ""


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Registry:
    """Plugins, methods and presets. Loading happens on first use, not at construction."""

    def __init__(self, *, autoload: bool = True, only: list[str] | None = None):
        self.autoload = autoload
        env = os.environ.get("MODAPT_PLUGINS")
        if only is None and env is not None:
            only = [p.strip() for p in env.split(",") if p.strip()]
        self.only = only
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._pending: list[tuple[Any, str, str]] = []
        self._methods: dict[str, Method] = {}
        self._conflicts: dict[str, list[str]] = {}
        self._presets: dict[str, Preset] = {}
        self._loaded = False

    # ----------------------------------------------------------------- loading
    def register_plugin(self, plugin: Any, name: str, distribution: str = "") -> None:
        """Register a plugin object (a module, usually) explicitly, under ``name``."""
        self._pending.append((plugin, name, distribution or name))
        if self._loaded:
            self._load_pending()

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.plugins.pop(name, None)
        self._methods = {k: m for k, m in self._methods.items() if m.plugin != name}
        self._presets = {k: p for k, p in self._presets.items() if p.distribution != name}

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.autoload:
            self._queue_entry_points()
        self._register_builtin()
        self._load_pending()

    def _register_builtin(self) -> None:
        from . import builtin

        if self.pm.get_plugin("modapt-core") is None:
            self._pending.insert(0, (builtin, "modapt-core", "modapt"))

    def _queue_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.only is not None and ep.name not in self.only:
                continue
            dist = ep.dist.name if ep.dist is not None else ep.name
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._broken(ep.name, dist, f"import failed: {type(exc).__name__}: {exc}")
                continue
            self._pending.append((plugin, ep.name, dist))

    def _broken(self, name: str, dist: str, error: str) -> None:
        self.plugins[name] = PluginInfo(name, dist, _dist_version(dist), status="broken", error=error)

    def _load_pending(self) -> None:
        pending, self._pending = self._pending, []
        for plugin, name, dist in pending:
            if self.pm.get_plugin(name) is not None:
                continue
            error = self._validate(plugin)
            if error:
                self._broken(name, dist, error)
                continue
            try:
                self.pm.register(plugin, name=name)
            except Exception as exc:
                self._broken(name, dist, f"invalid plugin: {exc}")
                continue
            self.plugins[name] = PluginInfo(name, dist, _dist_version(dist))
            self._call_registration(name, dist)
        self.pm.check_pending()

    def _validate(self, plugin: Any) -> str:
        """A hookimpl whose name is not a hook is an error (pytest's check_pending, per plugin)."""
        known = {n for n in dir(hookspecs) if n.startswith(HOOK_PREFIX)}
        for attr in dir(plugin):
            if not attr.startswith(HOOK_PREFIX):
                continue
            if self.pm.parse_hookimpl_opts(plugin, attr) is None:
                continue
            if attr not in known:
                return f"unknown hook '{attr}'{did_you_mean(attr, known)}"
        return ""

    def _impls(self, hook_name: str, plugin_name: str):
        hook = getattr(self.pm.hook, hook_name)
        return [impl for impl in hook.get_hookimpls() if impl.plugin_name == plugin_name]

    def _call_registration(self, name: str, dist: str) -> None:
        info = self.plugins[name]
        before_methods, before_presets = dict(self._methods), dict(self._presets)
        try:
            for impl in self._impls("modapt_register_methods", name):
                impl.function(lambda m, _n=name, _d=dist: self._add_method(m, _n, _d))
            for impl in self._impls("modapt_register_presets", name):
                impl.function(lambda pname, recipe, *, citation, description="", _d=dist:
                              self._add_preset(pname, recipe, citation, description, _d))
            for impl in self._impls("modapt_describe", name):
                described = impl.function() or {}
                info.description = str(described.get("description", ""))
        except Exception as exc:
            self._methods, self._presets = before_methods, before_presets
            self.pm.unregister(name=name)
            self._broken(name, dist, f"registration failed: {type(exc).__name__}: {exc}")
            return
        info.methods = sorted(k for k, m in self._methods.items() if m.plugin == name)
        info.presets = sorted(k for k, p in self._presets.items() if p.distribution == dist)

    def _add_method(self, method: Method, plugin: str, dist: str) -> None:
        if not isinstance(method, Method):
            raise PluginError(f"register() expects a modapt.Method, got {type(method).__name__}")
        if method.family not in FAMILIES:
            raise PluginError(f"method '{method.name}': family must be one of {', '.join(FAMILIES)}")
        if method.peft is not None and not isinstance(method.peft, PeftFormat):
            raise PluginError(f"method '{method.name}': peft must be a modapt.PeftFormat, "
                              f"got {type(method.peft).__name__}")
        method = _with_origin(method, plugin, dist)
        if method.name in self._conflicts:
            self._conflicts[method.name].append(dist)
            return
        other = self._methods.get(method.name)
        if other is not None:
            # neither wins: a silent replacement would change what a recipe means
            del self._methods[method.name]
            self._conflicts[method.name] = [other.distribution, dist]
            return
        self._methods[method.name] = method

    def _add_preset(self, name, recipe, citation, description, dist) -> None:
        if name in self._presets:
            raise PluginError(
                f"preset '{name}' is registered by both {self._presets[name].distribution} and {dist}"
            )
        self._presets[name] = Preset(name, recipe, citation, description, dist)

    # ----------------------------------------------------------------- lookups
    @property
    def methods(self) -> dict[str, Method]:
        self.ensure_loaded()
        return dict(self._methods)

    @property
    def presets(self) -> dict[str, Preset]:
        self.ensure_loaded()
        return dict(self._presets)

    def method(self, name: str) -> Method:
        """The method called ``name``; a clear :class:`PluginError` when it is not usable."""
        self.ensure_loaded()
        if name in self._conflicts:
            raise PluginError(
                f"method '{name}' is registered by both {' and '.join(self._conflicts[name])}; "
                "uninstall one of them"
            )
        try:
            return self._methods[name]
        except KeyError:
            raise PluginError(self.unknown_method_message(name)) from None

    def unknown_method_message(self, name: str) -> str:
        installed = ", ".join(sorted(self._methods)) or "none"
        hint = did_you_mean(name, self._methods)
        dist = distribution_of(name)
        if not hint:
            hint = f" — install {dist} (pip install {dist})"
        return f"unknown method '{name}'; installed: {installed}{hint}"

    def call(self, hook_name: str, **kwargs) -> list[Any]:
        """Call a life-cycle hook on every plugin; an exception names the plugin's distribution."""
        self.ensure_loaded()
        results = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            args = [kwargs[a] for a in impl.argnames]
            try:
                results.append(impl.function(*args))
            except RecipeError:
                raise  # a refusal (modapt_validate_recipe), not a plugin failure: the user's key path stays
            except Exception as exc:
                dist = self.plugins.get(impl.plugin_name, PluginInfo(impl.plugin_name, "?", "")).distribution
                raise PluginError(
                    f"plugin '{impl.plugin_name}' ({dist}) failed in {hook_name}: {type(exc).__name__}: {exc}"
                ) from exc
        return results


def _with_origin(method: Method, plugin: str, dist: str) -> Method:
    from dataclasses import replace

    return replace(method, plugin=plugin, distribution=dist)


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, created on first use (plugins load lazily after that)."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


@contextlib.contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the default inside the block (tests use this to isolate plugins)."""
    global _default
    previous, _default = _default, registry
    try:
        yield registry
    finally:
        _default = previous
