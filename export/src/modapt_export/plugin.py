"""The export distribution's plugin: it adds ``modapt merge`` and ``modapt export`` to the CLI.

Each command's module is imported only when the CLI is built, so ``import modapt`` stays light.
"""

from __future__ import annotations

import modapt


@modapt.hookimpl
def modapt_register_commands(register):
    from . import export_cli, merge_cli

    register("merge", merge_cli.configure, help="merge an adapter into a plain transformers checkpoint")
    register("export", export_cli.configure, help="export a (merged) model to ONNX and verify it")


@modapt.hookimpl
def modapt_describe():
    return {"description": "streaming merge, PEFT interop, ONNX export"}
