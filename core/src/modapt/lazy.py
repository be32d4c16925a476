"""Deferred imports for plugin entry modules: ``Lazy`` callables and lazy package exports.

``modapt plugins`` and ``modapt recipe check`` load every plugin's entry module to read its
methods' options and capabilities; none of that needs torch. A plugin keeps its entry module
free of torch by naming its implementation instead of importing it: ``build=Lazy("pkg.mod:Cls")``
in its :class:`modapt.Method`, and :func:`lazy_exports` in its package ``__init__`` (which
Python imports before the entry module).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Lazy:
    """A callable named ``"package.module:attribute"``, imported on its first call.

    After the first call the target is a ``sys.modules`` lookup away (cheap: ``build`` runs
    once per adapted layer). ``resolve()`` returns the object itself (tests check that every
    registered target imports).
    """

    target: str

    def __post_init__(self) -> None:
        module, _, attribute = self.target.partition(":")
        if not module or not attribute:
            raise ValueError(f"Lazy target must be 'package.module:attribute', got {self.target!r}")

    def resolve(self) -> Callable[..., Any]:
        """The named object (imports its module if needed)."""
        module, _, attribute = self.target.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part)
        return obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


def lazy_exports(package: str, names: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose public ``names`` live in submodules.

    ``names`` maps an exported name to its submodule (``{"Dora": "dora"}``): ``pkg.Dora`` and
    ``from pkg import Dora`` import ``pkg.dora`` on first use (PEP 562), so that importing the
    package (as importing its entry module does) imports none of them.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is not None:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        if not name.startswith("__"):
            try:  # a submodule used as an attribute (pkg.export) after a bare `import pkg`
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
