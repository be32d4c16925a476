"""The export distribution's plugin: it adds ``modapt merge`` and ``modapt export`` to the CLI.

Each command's module is imported only when the CLI is built, so ``import modapt`` stays light.
"""

from __future__ import annotations

import modapt


@modapt.hookimpl
def modapt_register_commands(register):
    # named, not imported: `modapt plugins` lists the commands without importing torch
    register("merge", modapt.Lazy("modapt_export.merge_cli:configure"),
             help="merge an adapter into a plain transformers checkpoint")
    register("export", modapt.Lazy("modapt_export.export_cli:configure"),
             help="export a (merged) model to ONNX and verify it")


@modapt.hookimpl
def modapt_describe():
    return {"description": "streaming merge, PEFT interop, ONNX export"}
