"""Making an LMAM model exportable with ``torch.onnx.export(dynamo=True)``.

The attention function is already traceable: the block where the map lands is computed from
shapes only (``torch.sym_min``), and the masks of ``lmam+eager`` / ``lmam+sdpa`` are always
4D tensors. What :func:`prepare` adds: the constant Attn_s of every adapted module is
precomputed (``merge``), so the graph holds one [h_s, n, n] constant per layer instead of
W_a, W_b and a matmul; from it, the per-layer constant of the graph path
(:mod:`modapt_lmam.graph_term`: the map repeated to the model's heads, masked by its causal
triangle, plus a zero row, in the model's dtype; dropped again by ``unmerge``); and a
flash-attention base, which does not export, is swapped for SDPA (the original
implementation comes back on ``modapt.remove``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import attachment as attachment_mod
from . import attention_map, graph_term, interface, targets


def prepare(model: nn.Module) -> None:
    """Prepare ``model`` (a model with LMAM attachments; others are left alone) for export."""
    import modapt

    if not modapt.is_adapted(model):
        return
    for _, attached in modapt.state_of(model).attachments.values():
        if not isinstance(attached, attachment_mod.LmamAttachment):
            continue
        if not attached.merged:
            attached.merge()
        config = attached.config
        if interface.base_of(config._attn_implementation_internal).startswith("flash"):
            config._attn_implementation_internal = interface.ensure_registered("sdpa")
        add_graph_constant(attached.module)


def add_graph_constant(module: nn.Module) -> None:
    """Register ``lmam_graph_map`` [h, n + 1, n] (:func:`graph_term.graph_constant`) on an
    adapted module whose map is merged."""
    spec = module.__dict__.get(interface.SPEC_ATTR)
    attn_s = module._buffers.get(attention_map.MERGED)
    if spec is None or attn_s is None:
        return
    dtype = next((p.dtype for name, p in module.named_parameters()
                  if not name.startswith("lmam_") and p.is_floating_point()), attn_s.dtype)
    with torch.no_grad():
        constant = graph_term.graph_constant(attn_s, targets.query_heads(module), spec.causal, dtype)
    module._buffers.pop(attention_map.GRAPH, None)
    module.register_buffer(attention_map.GRAPH, constant, persistent=False)
