"""``modapt presets [--json]``: every preset with its citation, the methods it needs, and
whether they are installed (and, when not, the distribution to install)."""

from __future__ import annotations

import argparse
import json

from modapt import default_registry
from modapt.registry import distribution_of

from .presets import PRESETS, methods_of

NOTES = {p.name: p.notes for p in PRESETS}  # choices made where the paper is silent


def presets_payload(registry) -> list[dict]:
    """One dict per registered preset: name, citation, description, recipe, methods (with status), notes."""
    installed = registry.methods
    out = []
    for name, preset in sorted(registry.presets.items()):
        needed = methods_of(preset.recipe)
        methods = [{"name": m, "installed": m in installed,
                    "distribution": installed[m].distribution if m in installed
                    else distribution_of(m)} for m in needed]
        out.append({"name": name, "citation": preset.citation, "description": preset.description,
                    "distribution": preset.distribution, "methods": methods,
                    "ready": all(m["installed"] for m in methods), "recipe": preset.recipe,
                    "notes": NOTES.get(name, [])})
    return out


def run(args) -> int:
    payload = presets_payload(default_registry())
    if args.json:
        print(json.dumps({"presets": payload}, indent=2))
        return 0
    for preset in payload:
        missing = [m for m in preset["methods"] if not m["installed"]]
        state = "ready" if not missing else "needs " + ", ".join(
            f"{m['name']} (pip install {m['distribution']})" for m in missing)
        print(f"{preset['name']:<22} {preset['description']}")
        print(f"{'':<22} methods: {', '.join(m['name'] for m in preset['methods'])}  [{state}]")
        print(f"{'':<22} {preset['citation']}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=run)
