"""The errors modapt raises for user mistakes. The CLI prints them without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ModaptError(Exception):
    """Base of every error caused by input (recipes, files, models, plugins), not by a bug."""


class RecipeError(ModaptError, ValueError):
    """A recipe is invalid. The message names the file, the key path, the value and the accepted ones."""

    def __init__(self, message: str, *, path: str = "", source: str | None = None):
        self.path = path
        self.source = source
        where = ""
        if source:
            where += f"{source}: "
        if path:
            where += f"{path}: "
        super().__init__(where + message)


class TargetError(RecipeError):
    """A recipe's targets match nothing (or the wrong kind of module) in the given model."""


class PluginError(ModaptError):
    """A plugin is missing, broken, or collides with another plugin."""


class AdapterLoadError(ModaptError):
    """An adapter directory cannot be loaded onto this model (format, shapes, fingerprint, files)."""


class StateError(ModaptError, RuntimeError):
    """An operation does not fit the model's state (merging twice, unmerging an unloaded model)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" — did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""
