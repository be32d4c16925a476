"""The one ``modapt`` command. The core owns ``plugins``, ``recipe`` and ``train``; other
distributions add subcommands through ``modapt_register_commands`` (export adds ``merge`` and
``export``, composers adds ``presets``).

Exit codes: 0 ok, 1 invalid input (a :class:`ModaptError`, printed without a traceback),
2 usage (argparse's own).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from . import __version__
from .errors import ModaptError
from .registry import Registry, default_registry

CORE_COMMANDS = ("plugins", "recipe", "train")
# commands that come with other distributions of this project, for a helpful message
COMMAND_DISTRIBUTIONS = {"merge": "modapt-export", "export": "modapt-export", "presets": "modapt-composers"}


def _plugins_payload(registry: Registry) -> dict:
    methods = registry.methods
    plugins = []
    for info in sorted(registry.plugins.values(), key=lambda i: i.name):
        plugins.append({
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "status": info.status,
            "error": info.error,
            "description": info.description,
            "methods": [
                {"name": m, "family": methods[m].family, "description": methods[m].description,
                 "capabilities": methods[m].capabilities.as_dict(), "keys": list(methods[m].own_keys)}
                for m in info.methods if m in methods
            ],
            "presets": info.presets,
        })
    families: dict[str, list[str]] = {}
    for name, method in sorted(methods.items()):
        families.setdefault(method.family, []).append(name)
    return {"modapt": __version__, "plugins": plugins, "families": families,
            "presets": sorted(registry.presets)}


def cmd_plugins(args) -> int:
    registry = default_registry()
    payload = _plugins_payload(registry)
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(f"modapt {payload['modapt']}")
    for plugin in payload["plugins"]:
        status = "" if plugin["status"] == "ok" else f"  BROKEN: {plugin['error']}"
        print(f"\n{plugin['name']}  ({plugin['distribution']} {plugin['version']}){status}")
        for m in plugin["methods"]:
            caps = m["capabilities"]
            flags = ", ".join(f for f in ("mergeable", "exportable") if caps[f])
            print(f"  {m['name']:<12} {m['family']:<9} [{flags}]  {m['description']}")
        if plugin["presets"]:
            print(f"  presets: {', '.join(plugin['presets'])}")
    return 0


def cmd_recipe_check(args) -> int:
    from .recipe import parse_recipe

    recipe = parse_recipe(args.file)
    resolved = recipe.to_dict()
    if args.json:
        print(json.dumps(resolved, indent=2))
    else:
        import tomli_w

        print(f"# {args.file}: valid")
        print(tomli_w.dumps(resolved), end="")
    return 0


def _configure_recipe(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe_command", metavar="{check}", required=True)
    check = sub.add_parser("check", help="validate a recipe file and print it resolved")
    check.add_argument("file", help="a .toml, .json or .yaml recipe")
    check.add_argument("--json", action="store_true", help="print the resolved recipe as JSON")
    check.set_defaults(run=cmd_recipe_check)


def _configure_train(parser: argparse.ArgumentParser) -> None:
    from .train_cli import configure

    configure(parser)


def build_parser(registry: Registry | None = None) -> argparse.ArgumentParser:
    registry = registry or default_registry()
    parser = argparse.ArgumentParser(prog="modapt", description="Parameter-efficient fine-tuning adapters as plugins.")
    parser.add_argument("--version", action="version", version=f"modapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list installed plugins, their methods and capabilities")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(run=cmd_plugins)
    _configure_recipe(sub.add_parser("recipe", help="check recipes"))
    _configure_train(sub.add_parser("train", help="fine-tune a model with a recipe"))
    taken = set(CORE_COMMANDS)

    def register(name: str, configure: Callable, *, help: str = "") -> None:
        if name in taken:
            raise ModaptError(f"a plugin tries to register the command '{name}', which is taken")
        taken.add(name)
        configure(sub.add_parser(name, help=help))

    # one plugin at a time: a plugin that fails here (or tries to take a command) loses its own
    # commands, with a warning naming its distribution; the rest of the CLI keeps working
    registry.ensure_loaded()
    for impl in reversed(registry.pm.hook.modapt_register_commands.get_hookimpls()):
        try:
            impl.function(register)
        except Exception as exc:  # noqa: BLE001 - any plugin failure, reported below, must not stop the CLI
            info = registry.plugins.get(impl.plugin_name)
            dist = info.distribution if info is not None else "?"
            print(f"modapt: warning: plugin '{impl.plugin_name}' ({dist}) failed in modapt_register_commands: "
                  f"{type(exc).__name__}: {exc}; its commands are not available", file=sys.stderr)
    for name, dist in COMMAND_DISTRIBUTIONS.items():
        if name not in taken:
            missing = sub.add_parser(name, help=f"(install {dist})", add_help=False)
            missing.add_argument("rest", nargs=argparse.REMAINDER)
            missing.set_defaults(run=_missing(name, dist))
    return parser


def _missing(name: str, dist: str):
    def run(args) -> int:
        raise ModaptError(f"'modapt {name}' comes with the {dist} distribution: pip install {dist}")

    return run


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.run(args) or 0)
    except ModaptError as exc:
        print(f"modapt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("modapt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
