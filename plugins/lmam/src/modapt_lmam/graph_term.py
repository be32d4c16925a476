"""LMAM attention as exported graphs hold it: five nodes per adapted layer.

An exported graph runs every node of every layer, and ONNX Runtime pays a fixed cost per
node (on the H100 at the 135M shape the base graph ran at ~7 µs a node at batch 1 × 64, and
LMAM's ~16 extra nodes per layer cost +19 %), so the export writes the term with as few
per-layer nodes as the dynamic shapes allow. Everything that does not depend on the inputs is
folded into one constant per layer at export time (:func:`graph_constant`, by
:func:`modapt_lmam.export.prepare`), and everything that depends on the inputs but not on the
layer is computed once per graph and shared by all layers (:func:`shared_indices`: every
layer receives the same 4D mask tensor, so the first layer's results are reused by the
others). What is left per layer:

    A    = C_l[:, rows] · keep          Gather, Mul   [B, h, q, n]
    Vb   = V_r[:, :, cols]              Gather        [B, h, n, d]   V on the block's key slots
    O    = softmax(QKᵀ·s + M)·V_r + A·Vb    MatMul, Add (the base attention written out)

C_l [h, n + 1, n] holds the map repeated to the model's heads (eq. 17), times its own lower
triangle when the module is causal (eq. 11), and a zero row; ``rows`` [q] gives each query its
map row (past + i with ``head``) or the zero row when that lies outside the map; ``keep``
[B, 1, q, n] is 1 where the base attention's mask attends the block column's key slot
(padding, causality, sliding windows) and the slot exists. This is the eager term
(:mod:`modapt_lmam.term`) entry for entry: the same map values times the same kept set,
computed on the q queries instead of n block rows. Rows are gathered whole (n contiguous
values): a per-entry gather (one GatherND of a [B, h, q, n] index, one node fewer) ran at
~30 ns an element on ONNX Runtime's CPU, 2.2× the base graph's time at 1 × 64.

The base attention is written out here (SDPA's math on the 4D float mask the export always
passes: QKᵀ·scale + mask, softmax, ·V over ``repeat_kv``'d keys and values) so that the term
can reuse its repeated V and add before the output transpose; that is the only reason it is
not the base function's own graph. Only plain LMAM on an SDPA base takes this path; ¬N, ¬S,
eager bases (whose eager functions differ per model) and anything unusual in the call keep
the general graph of :mod:`modapt_lmam.term`.
"""

from __future__ import annotations

import math
import weakref

import torch

from .attention_map import GRAPH as CONSTANT

#: id(mask) -> (weakref to the mask, {(n, align): (rows, keep, cols)})
_SHARED: dict[int, tuple[weakref.ref, dict]] = {}


def graph_constant(attn_s: torch.Tensor, heads: int, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """C [h, n + 1, n] in ``dtype``: Attn_s [h_s, n, n] repeated to h heads (head j reads LMAM
    head j mod h_s), masked by its lower triangle when ``causal``, then a row of zeros (the
    row of every query whose map row lies outside the map).

    The eager term multiplies the map by its keep mask in the map's dtype and casts the
    product to V's dtype; casting first and multiplying by the same 0/1 gives the same values.
    """
    h_s, n = attn_s.shape[0], attn_s.shape[1]
    maps = attn_s.repeat(heads // h_s, 1, 1)
    if causal:
        maps = maps.tril()
    return torch.cat([maps, maps.new_zeros(heads, 1, n)], dim=1).to(dtype)


def shared_indices(mask: torch.Tensor, q: int, length: int, n: int, align: str):
    """(rows [q], keep [B, 1, q, n] in the mask's dtype, cols [n]), once per mask.

    ``mask`` [B, 1, q, L] float, 0 where the base attention attends. Query i (slot past + i)
    reads map row past + i (``head``) or i - q + n (``tail``), or C's zero row n when that is
    outside the map; block column c is key slot c (``head``) or L - n + c (``tail``) and map
    column c; ``keep`` is 1 where the base attention attends that slot and the slot exists.
    """
    cache_key = (n, align)
    entry = _SHARED.get(id(mask))
    if entry is not None and entry[0]() is mask and cache_key in entry[1]:
        return entry[1][cache_key]
    device = mask.device
    query = torch.arange(q, device=device)
    column = torch.arange(n, device=device)
    if align == "tail":
        rows = query + (n - q)
        slots = column + (length - n)
    else:
        rows = query + (length - q)
        slots = column
    rows = torch.where((rows >= 0) & (rows < n), rows, n)
    cols = slots.clamp(min=0, max=length - 1)
    keep = ((slots >= 0) & (slots < length)) & (mask.index_select(3, cols) == 0)  # [B, 1, q, n]
    if entry is None or entry[0]() is not mask:
        for key in [k for k, (ref, _) in _SHARED.items() if ref() is None]:
            del _SHARED[key]
        entry = _SHARED[id(mask)] = (weakref.ref(mask), {})
    entry[1][cache_key] = shared = (rows, keep.to(mask.dtype), cols)
    return shared


def applies(module, attention_mask, query, key, kwargs) -> bool:
    """Whether this call can take the graph path (otherwise the general term is traced)."""
    if module._buffers.get(CONSTANT) is None:
        return False
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return False
    if not attention_mask.dtype.is_floating_point or query.shape[1] % key.shape[1]:
        return False
    if kwargs.get("dropout", 0.0) not in (0, 0.0) and module.training:
        return False
    return all(kwargs.get(name) is None for name in ("position_bias", "cache", "softcap", "s_aux", "sinks"))


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
              n: int, align: str, scaling: float | None = None, **kwargs):
    """SDPA on the 4D float mask plus the LMAM term; query [B, h, q, d], key/value [B, h_kv, L, d]
    -> ([B, q, h, d], None), as ``sdpa_attention_forward`` returns."""
    batch, heads, q, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if groups > 1:
        key = key[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, heads, length, dim)
        value = value[:, :, None].expand(batch, kv_heads, groups, length, value.shape[-1]).reshape(
            batch, heads, length, value.shape[-1])
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale + attention_mask
    probs = scores.softmax(dim=-1)
    rows, keep, cols = shared_indices(attention_mask, q, length, n, align)
    constant = module._buffers[CONSTANT]  # prepare() wrote it in the model's dtype
    if constant.dtype != value.dtype:
        constant = constant.to(value.dtype)
    weights = constant.index_select(1, rows) * keep.to(value.dtype)  # [B, h, q, n]
    out = torch.matmul(probs, value) + torch.matmul(weights, value.index_select(2, cols))
    return out.transpose(1, 2).contiguous(), None
