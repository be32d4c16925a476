"""The composers plugin: registers the presets, the ``presets`` command and the composition rules."""

from __future__ import annotations

import modapt

from . import command, rules
from .presets import PRESETS


@modapt.hookimpl
def modapt_register_presets(register):
    for preset in PRESETS:
        register(preset.name, preset.recipe, citation=preset.citation, description=preset.description)


@modapt.hookimpl
def modapt_register_commands(register):
    register("presets", command.configure, help="list the presets, their citations and the methods they need")


@modapt.hookimpl
def modapt_validate_recipe(recipe, registry):
    rules.check_recipe(recipe, registry)


@modapt.hookimpl
def modapt_describe():
    return {"description": "the papers' compositions as presets, and the rules of composition"}
