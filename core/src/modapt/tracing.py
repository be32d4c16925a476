"""Whether the current call is being traced into a graph rather than run eagerly."""

from __future__ import annotations

import torch


def tracing() -> bool:
    """True under torch.export / torch.onnx.export(dynamo=True), torch.compile and jit tracing.

    Fused autograd nodes and shape-dependent shortcuts are eager-only: a graph keeps the plain,
    shape-independent path.
    """
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing())


def exporting() -> bool:
    """True under torch.export / torch.onnx.export(dynamo=True) and jit tracing, not torch.compile.

    For fused paths that a compiled graph can keep: dynamo traces a ``torch.autograd.Function``'s
    forward and backward into the graph, while an exported program or ONNX file needs the
    plain ops (and jit tracing records no custom backward).
    """
    return bool(torch.compiler.is_exporting() or torch.jit.is_tracing())
