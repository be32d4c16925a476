"""Making an LMAM model exportable with ``torch.onnx.export(dynamo=True)``.

The attention function is already traceable: the block where the map lands is computed from
shapes only (``torch.sym_min``), and the masks of ``lmam+eager`` / ``lmam+sdpa`` are always
4D tensors. What :func:`prepare` adds: the constant Attn_s of every adapted module is
precomputed (``merge``), so the graph holds one [h_s, n, n] constant per layer instead of
W_a, W_b and a matmul; and a flash-attention base, which does not export, is swapped for SDPA
(the original implementation comes back on ``modapt.remove``).
"""

from __future__ import annotations

from torch import nn

from . import attachment as attachment_mod, interface


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
