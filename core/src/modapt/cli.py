"""The one ``modapt`` command. The core owns ``plugins``, ``recipe`` and ``train``; other
distributions add subcommands through ``modapt_register_commands`` (export adds ``merge`` and
``export``, composers adds ``presets``).

Exit codes: 0 ok, 1 invalid input (a :class:`ModaptError`, an ``OSError`` such as a full
disk, a read-only folder or a file-size limit: one line on stderr, no traceback unless
``--debug``), 2 usage (argparse's own). A reader that closes stdout early (``modapt plugins |
head -1``) ends the command quietly with exit 1.

Fast start: ``modapt --help``, ``modapt plugins``-style core commands and ``modapt recipe
check`` build the parser without calling the plugins' ``modapt_register_commands``; the
commands of this project's other distributions are listed from :data:`COMMAND_DISTRIBUTIONS`
(installed or not, from the distribution metadata). The plugins' command hooks run only when
the command is not a core one. Nothing here imports torch; ``train`` is configured only when
it is the command.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from collections.abc import Callable

from .errors import ModaptError
from .registry import Registry, default_registry

CORE_COMMANDS = ("plugins", "recipe", "train")
# commands that come with other distributions of this project, for a helpful message
COMMAND_DISTRIBUTIONS = {"merge": "modapt-export", "export": "modapt-export", "presets": "modapt-composers"}
# their one-line help, shown by `modapt --help` without importing the distribution
COMMAND_HELP = {
    "merge": "merge an adapter into a plain transformers checkpoint",
    "export": "export a (merged) model to ONNX and verify it",
    "presets": "list the presets, their citations and the methods they need",
}
TRAIN_HELP = "fine-tune a model with a recipe"


def finite_float(text: str) -> float:
    """argparse ``type=`` for float options: NaN and ±Inf are usage errors (exit 2), like a typo."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def count(text: str) -> int:
    """argparse ``type=`` for counts (steps, sizes): an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; a count is >= 0")
    return value


def _plugins_payload(registry: Registry, version: str) -> dict:
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
    return {"modapt": version, "plugins": plugins, "families": families,
            "presets": sorted(registry.presets)}


def _plugin_commands(registry: Registry) -> dict[str, list[str]]:
    """{plugin name: the commands its ``modapt_register_commands`` registers}, without building them."""
    out: dict[str, list[str]] = {}
    for impl in registry.pm.hook.modapt_register_commands.get_hookimpls():
        names: list[str] = []
        try:
            impl.function(lambda name, configure, *, help="": names.append(name))
        except Exception:  # noqa: BLE001 - a failing plugin is reported when its command is used
            continue
        out[impl.plugin_name] = names
    return out


def cmd_plugins(args) -> int:
    from . import __version__

    registry = default_registry()
    payload = _plugins_payload(registry, __version__)
    commands = _plugin_commands(registry)
    for plugin in payload["plugins"]:
        plugin["commands"] = commands.get(plugin["name"], [])
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
        if plugin["commands"]:
            print(f"  commands: {', '.join(plugin['commands'])}")
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


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def build_parser(registry: Registry | None = None, *, command: str | None = "") -> argparse.ArgumentParser:
    """The ``modapt`` parser.

    command: the subcommand about to run. ``train`` gets its full options only when it is the
    command; when the command is a core one or none (``--help``), the plugins' command hooks
    are not called and the project's other commands are listed from :data:`COMMAND_HELP`.
    The default ``""`` builds everything (the plugins' commands included).
    """
    from . import __version__

    parser = argparse.ArgumentParser(prog="modapt", description="Parameter-efficient fine-tuning adapters as plugins.",
                                     epilog="Plugins may add commands: 'modapt plugins' lists them.")
    parser.add_argument("--version", action="version", version=f"modapt {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list installed plugins, their methods and capabilities")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(run=cmd_plugins)
    _configure_recipe(sub.add_parser("recipe", help="check recipes"))
    train = sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP)
    if command in ("train", ""):
        _configure_train(train)
    taken = set(CORE_COMMANDS)
    if command is None or command in CORE_COMMANDS:
        for name, dist in COMMAND_DISTRIBUTIONS.items():
            suffix = "" if _installed(dist) else f" (install {dist})"
            sub.add_parser(name, help=COMMAND_HELP.get(name, "") + suffix, add_help=False)
        return parser
    registry = registry or default_registry()

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
    if command in COMMAND_DISTRIBUTIONS and command not in taken:
        # before argparse sees the command's own options (it would answer "unrecognized arguments")
        dist = COMMAND_DISTRIBUTIONS[command]
        raise ModaptError(f"'modapt {command}' comes with the {dist} distribution, which is not installed "
                          f"(or failed to load: see 'modapt plugins'): pip install {dist}")
    for name, dist in COMMAND_DISTRIBUTIONS.items():
        if name not in taken:
            sub.add_parser(name, help=f"(install {dist})", add_help=False)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand token of ``argv`` (the first word that is not an option), or None."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def _debug_requested(argv: list[str]) -> bool:
    for arg in argv:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False  # a subcommand's own --debug is not ours
    return False


def _os_error_line(exc: OSError) -> str:
    """One line for a failed read or write: the file, the cause and what to do."""
    where = exc.filename if exc.filename is not None else "?"
    hints = {
        errno.ENOSPC: "the disk is full: free space or choose another output folder",
        errno.EDQUOT: "the disk quota is exhausted: free space or choose another output folder",
        errno.EFBIG: "the file-size limit (ulimit -f) is too small for this file",
        errno.EROFS: "the filesystem is read-only: choose a writable output folder",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }
    cause = hints.get(exc.errno, exc.strerror or type(exc).__name__)
    return f"{where}: {cause}"


def _stdout_closed() -> None:
    # the reader is gone: point stdout at /dev/null so that the interpreter's final flush is quiet
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        parser = build_parser(command=_command_of(argv))
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a broken pipe shows here, inside the handlers below
        return code
    except ModaptError as exc:
        return _fail(str(exc), debug)
    except KeyboardInterrupt:
        print("modapt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if exc.filename is None:  # our stdout (or stderr) reader closed the pipe
            _stdout_closed()
            return 1
        return _fail(_os_error_line(exc), debug)
    except OSError as exc:
        return _fail(_os_error_line(exc), debug)
    except RecursionError:
        return _fail("input nested too deeply to be read", debug)
    except MemoryError:
        return _fail("out of memory (an input far larger than it should be?)", debug)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback under --debug
        return _fail(f"internal error: {type(exc).__name__}: {exc} (run 'modapt --debug ...' for the traceback "
                     "and report it)", debug)


def _fail(message: str, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    line = " | ".join(part.strip() for part in message.strip().splitlines()) or "error"
    try:
        print(f"modapt: error: {line}", file=sys.stderr)
    except (BrokenPipeError, OSError):
        pass
    return 1


if __name__ == "__main__":
    sys.exit(main())
