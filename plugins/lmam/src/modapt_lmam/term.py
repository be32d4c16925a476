"""The LMAM term of one attention call, without an N×N map.

Because Attn_s is added after the softmax (eq. 12),

    O = (softmax(QKᵀ/√d) + Attn_s) · V = softmax(QKᵀ/√d) · V  +  Attn_s · V,

the base attention runs unchanged (eager, SDPA, flash) and LMAM adds ``Attn_s[block] · V[block]``
over the block where the map lands (:mod:`modapt_lmam.region`): an h·m²·d_h computation with
m = min(n, N), never a map over all N keys.

Shapes: query [B, h, q, d], value [B, h_kv, L, d_v] (h_kv divides h: grouped-query attention
is served without repeating V), the base output [B, q, h, d_v] (transformers' layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .region import Region, causal_block


def head_maps(attn_s: torch.Tensor, reg: Region, heads: int) -> torch.Tensor:
    """The map's block for every model head: [h, rows, cols]; head j reads LMAM head j mod h_s (eq. 17)."""
    block = attn_s[:, reg.map_row:reg.map_row + reg.rows, reg.map_col:reg.map_col + reg.cols]
    return block.repeat(heads // attn_s.shape[0], 1, 1)


def keep_mask(attention_mask: torch.Tensor | None, reg: Region, causal: bool, device) -> torch.Tensor | None:
    """bool [B or 1, 1 or h, rows, cols]: which (query, key) pairs of the block the term may use.

    It is the mask the base attention got (causality, padding, sliding windows), read in the
    block: a 4D float mask (0 where attended, as ``eager_mask`` makes it), a 4D bool mask, or
    a 2D padding mask [B, L] (flash attention). A causal module also applies the map's own
    lower triangle (eq. 11), so a missing mask never lets a query see later keys. ``None``
    means every pair is kept.
    """
    keep = None
    if attention_mask is not None:
        keys = slice(reg.key_start, reg.key_start + reg.cols)
        if attention_mask.dim() == 2:
            keep = attention_mask[:, None, None, keys].bool()
        else:
            block = attention_mask[:, :, reg.query_start:reg.query_start + reg.rows, keys]
            keep = block if block.dtype == torch.bool else block == 0
    if causal:
        tri = causal_block(reg, device)[None, None]
        keep = tri if keep is None else keep & tri
    return keep


def block_weights(attn_s: torch.Tensor, reg: Region, heads: int, keep: torch.Tensor | None,
                  softmax_map: bool) -> torch.Tensor:
    """The added attention weights on the block: [B or 1, h, rows, cols], in Attn_s's dtype.

    LMAM: Attn_s ⊙ keep. ¬S (``softmax_map``): softmax(Attn_s) over the kept keys of each row
    (a row with no kept key adds nothing).
    """
    maps = head_maps(attn_s, reg, heads)[None]
    if softmax_map:
        if keep is None:
            return maps.softmax(-1)
        masked = maps.masked_fill(~keep, torch.finfo(maps.dtype).min)
        return torch.where(keep, masked.softmax(-1), torch.zeros((), dtype=maps.dtype, device=maps.device))
    return maps if keep is None else maps * keep.to(maps.dtype)


def apply_block(weights: torch.Tensor, value: torch.Tensor, reg: Region) -> torch.Tensor:
    """weights [B or 1, h, rows, cols] · value[:, :, keys] -> [B, h, rows, d_v], in value's dtype.

    The h query heads are grouped over the h_kv value heads (head j reads value head j // g),
    so V is used in place rather than repeated g times.
    """
    b_w, heads, rows, cols = weights.shape
    batch, kv_heads, _, dim = value.shape
    group = heads // kv_heads
    v = value[:, :, reg.key_start:reg.key_start + reg.cols]
    w = weights.to(value.dtype).reshape(b_w, kv_heads, group * rows, cols)
    return torch.matmul(w, v).reshape(batch, heads, rows, dim)


def add_rows(output: torch.Tensor, term: torch.Tensor, reg: Region) -> torch.Tensor:
    """output [B, q, h, d] + term [B, h, rows, d] on the queries of the block (out of place)."""
    start, stop = reg.query_start, reg.query_start + reg.rows
    added = output[:, start:stop] + term.transpose(1, 2).to(output.dtype)
    return torch.cat([output[:, :start], added, output[:, stop:]], dim=1)


def add_to_weights(attn_weights: torch.Tensor, weights: torch.Tensor, reg: Region) -> torch.Tensor:
    """The returned attention probabilities [B, h, q, L] + the block (so output_attentions shows Attn^)."""
    out = attn_weights.clone()
    rows = slice(reg.query_start, reg.query_start + reg.rows)
    keys = slice(reg.key_start, reg.key_start + reg.cols)
    out[:, :, rows, keys] = out[:, :, rows, keys] + weights.to(out.dtype)
    return out


def scores_bias(attention_mask: torch.Tensor, attn_s: torch.Tensor, reg: Region, heads: int, q: int,
                length: int, dtype: torch.dtype) -> torch.Tensor:
    """The paper's ¬N: the additive mask [B, h, q, L] that puts Attn_s inside the softmax.

    This ablation does materialise a per-head bias over all L keys (the base attention takes
    it as its mask); the masked entries stay at the mask's minimum.
    """
    maps = head_maps(attn_s, reg, heads)
    bias = F.pad(maps, (reg.key_start, length - reg.key_start - reg.cols,
                        reg.query_start, q - reg.query_start - reg.rows))
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.where(attention_mask, torch.zeros((), dtype=dtype, device=attention_mask.device),
                                     torch.finfo(dtype).min)
    return attention_mask + bias[None].to(attention_mask.dtype)
