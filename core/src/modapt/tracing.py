"""Whether the current call is being traced into a graph rather than run eagerly."""

from __future__ import annotations

import torch


def tracing() -> bool:
    """True under torch.export / torch.onnx.export(dynamo=True), torch.compile and jit tracing.

    Fused autograd nodes and shape-dependent shortcuts are eager-only: a graph keeps the plain,
    shape-independent path.
    """
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing())
