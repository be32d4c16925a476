"""The static map Attn_s of LMAM and its parameters (eqs. 6-10 of the paper).

    Attn_s = ((W_a + P_a) · (W_b + P_b)) · s          [h_s, n, n]
    W_a [h_s, n, r] (``lmam_Wa``), W_b [h_s, r, n] (``lmam_Wb``): trainable
    P_a[:, pos, :] = P_b[:, :, pos] = 1 / 10000^(2·pos/n)   (eqs. 7-9, fixed buffers)

With ``full_rank`` (the paper's ¬L, FMAM) a single parameter ``lmam_W`` [h_s, n, n] replaces
W_a W_b and Attn_s = W · s. Everything lives on the attention module; the names here are the
state-dict keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

WA, WB, W_FULL = "lmam_Wa", "lmam_Wb", "lmam_W"
PA, PB = "lmam_Pa", "lmam_Pb"
MERGED = "lmam_attn_s"
GRAPH = "lmam_graph_map"  # the export's constant (modapt_lmam.graph_term), derived from MERGED
PARAMETERS = (WA, WB, W_FULL)
BUFFERS = (PA, PB, MERGED, GRAPH)


def positional_term(n: int) -> torch.Tensor:
    """PE_pos = 1 / 10000^(2·pos/n) for pos = 0..n-1 (eq. 7), float32 [n].

    Computed in float64 so that ``init = "zero"`` (W_a = −P_a) cancels exactly in float32.
    """
    pos = torch.arange(n, dtype=torch.float64)
    return (1.0 / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2.0 * pos / n)).float()


def add_parameters(module: nn.Module, options, heads: int) -> None:
    """Register the LMAM parameters and buffers on ``module`` and initialise them.

    W_a [h_s, n, r], W_b [h_s, r, n] (or W [h_s, n, n] with ``full_rank``); the positional
    terms P_a [1, n, 1] and P_b [1, 1, n] as non-persistent buffers (they follow from n, so the
    adapter file does not carry them). Initialisation (the paper does not give one):
    ``zero``: W_a = −P_a (0 without positions), W_b ~ N(0, 1/r), hence Attn_s = 0 exactly while
    ∂L/∂W_a = s · ∂L/∂Attn_s · (W_b + P_b)ᵀ ≠ 0; ``random``: W_a, W_b ~ N(0, 1/r).
    FMAM: ``zero`` is W = 0, ``random`` is W ~ N(0, 1/n).
    """
    n, r = options.n, options.r
    weight = next((p for p in module.parameters()), None)
    device = weight.device if weight is not None else None
    if options.full_rank:
        w = torch.zeros(heads, n, n, device=device)
        if options.init == "random":
            nn.init.normal_(w, std=1.0 / math.sqrt(n))
        module.register_parameter(W_FULL, nn.Parameter(w))
        return
    pe = positional_term(n).to(device)
    pa, pb = pe.view(1, n, 1), pe.view(1, 1, n)
    if options.position:
        module.register_buffer(PA, pa.clone(), persistent=False)
        module.register_buffer(PB, pb.clone(), persistent=False)
    wa = torch.empty(heads, n, r, device=device)
    wb = torch.empty(heads, r, n, device=device)
    nn.init.normal_(wb, std=1.0 / math.sqrt(r))
    if options.init == "zero":
        wa.copy_(-pa.expand(heads, n, r) if options.position else torch.zeros(heads, n, r))
    else:
        nn.init.normal_(wa, std=1.0 / math.sqrt(r))
    module.register_parameter(WA, nn.Parameter(wa))
    module.register_parameter(WB, nn.Parameter(wb))


def compute_map(module: nn.Module, scale: float) -> torch.Tensor:
    """Attn_s [h_s, n, n] from the module's parameters, in their dtype (eq. 10; FMAM: W · s)."""
    params = module._parameters
    if params.get(W_FULL) is not None:
        return params[W_FULL] * scale
    wa, wb = params[WA], params[WB]
    buffers = module._buffers
    if buffers.get(PA) is not None:
        wa = wa + buffers[PA].to(wa.dtype)
        wb = wb + buffers[PB].to(wb.dtype)
    return torch.matmul(wa, wb) * scale


def current_map(module: nn.Module, scale: float) -> torch.Tensor:
    """The precomputed constant after ``merge`` (buffer ``lmam_attn_s``), else :func:`compute_map`."""
    merged = module._buffers.get(MERGED)
    return merged if merged is not None else compute_map(module, scale)


def remove_all(module: nn.Module) -> None:
    """Delete every LMAM parameter and buffer from ``module``."""
    for name in PARAMETERS:
        module._parameters.pop(name, None)
    for name in BUFFERS:
        module._buffers.pop(name, None)
        module._non_persistent_buffers_set.discard(name)
