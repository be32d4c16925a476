"""The LMAM term of one attention call, without an N×N map.

Because Attn_s is added after the softmax (eq. 12),

    O = (softmax(QKᵀ/√d) + Attn_s) · V = softmax(QKᵀ/√d) · V  +  Attn_s · V,

the base attention runs unchanged (eager, SDPA, flash) and LMAM adds ``Attn_s[block] · V[block]``
over the n×n block where the map lands: an h·n²·d_h computation, never a map over all N keys.

Where the block lands (positions are key slots 0..L-1 of the attention map, as the paper
indexes eqs. 14-16; the q queries are the last q slots L-q..L-1, so with a KV cache the
query at absolute slot t reads row t of the map against the cached keys 0..t):

- ``head`` (eqs. 14-15): map index k ↔ slot k. n ≤ L: the map covers [:n, :n]; n > L: only
  [:L, :L] of it is used (the crop of eq. 15).
- ``tail`` (eq. 16): map index k ↔ slot L - n + k, the last n tokens; n > L: the map's last
  L rows and columns are used, so the last token always reads the map's last row.

Every block is exactly n wide: the rows of V, of the mask and of the map are gathered with
n clamped indices (``index_select``), and the output is extended by n zero rows to add the
block's rows. The graph then holds only the sizes n, q, L and q + n, never min(n, L), so
``torch.export`` with dynamic shapes neither guards nor specialises on whether the sample is
longer than n. The cost is O(n²) gathers and one copy of the output.

Shapes: attn_s [h_s, n, n]; value [B, h_kv, L, d] (h_kv divides h: grouped-query attention is
served without repeating V); the base output [B, q, h, d] (transformers' layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from modapt.tracing import tracing


@dataclass(frozen=True)
class Block:
    """The n×n block for one call: ``maps`` [h_s, n, n] (rows: the block's query rows),
    ``keep`` bool [B or 1, 1 or h, n, n] and the slots of its rows and columns."""

    maps: torch.Tensor
    keep: torch.Tensor
    row_slots: torch.Tensor
    col_slots: torch.Tensor


def block(attn_s: torch.Tensor, q: int, length: int, attention_mask: torch.Tensor | None, *,
          causal: bool, align: str) -> Block:
    """Which map entries the q queries over ``length`` keys use, and which (query, key) pairs are kept.

    Block rows are the first n queries (``head``) or the last n (``tail``); with ``head`` and
    a cache, row i is the query at slot past + i and reads map row past + i.

    ``keep`` is the mask the base attention got (causality, padding, sliding windows), read
    on the block: a 4D float mask (0 where attended, as ``eager_mask`` makes it), a 4D bool
    mask, or a 2D padding mask [B, L] (flash attention). A causal module also applies the
    map's own lower triangle (eq. 11), so a ``None`` mask (SDPA's ``is_causal``) never lets a
    query see a later key. Rows and columns outside the map, the queries or the keys are
    never kept; the gathers below clamp their indices, and ``keep`` zeroes what they repeat.
    """
    n = attn_s.shape[1]
    device = attn_s.device
    past = length - q
    index = torch.arange(n, device=device)
    if align == "tail":
        maps = attn_s
        row_slots = index + (length - n)
        col_slots = index + (length - n)
        rows_ok = row_slots >= past
        cols_ok = col_slots >= 0
    else:
        row_slots = index + past
        col_slots = index
        maps = attn_s.index_select(1, row_slots.clamp(max=n - 1))
        rows_ok = (row_slots < n) & (row_slots < length)
        cols_ok = col_slots < length
    keep = rows_ok[:, None] & cols_ok[None, :]
    if causal:
        keep = keep & (col_slots[None, :] <= row_slots[:, None])
    keep = keep[None, None]
    if attention_mask is not None:
        cols = col_slots.clamp(min=0, max=length - 1)
        if attention_mask.dim() == 2:
            keep = keep & attention_mask.index_select(1, cols).bool()[:, None, None, :]
        else:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            rows = (row_slots - past).clamp(min=0, max=q - 1)
            keep = keep & mask.index_select(2, rows).index_select(3, cols)
    return Block(maps, keep, row_slots, col_slots)


def block_weights(blk: Block, heads: int, softmax_map: bool) -> torch.Tensor:
    """The added attention weights on the block, [B or 1, h, n, n] in Attn_s's dtype.

    Model head j reads LMAM head j mod h_s (the paper's ``repeat``, eq. 17).
    LMAM: Attn_s ⊙ keep. ¬S (``softmax_map``): softmax(Attn_s) over the kept keys of each row
    (a row without a kept key adds nothing).
    """
    maps = blk.maps.repeat(heads // blk.maps.shape[0], 1, 1)[None]
    keep = blk.keep
    if softmax_map:
        masked = maps.masked_fill(~keep, torch.finfo(maps.dtype).min)
        return torch.where(keep, masked.softmax(-1), torch.zeros((), dtype=maps.dtype, device=maps.device))
    return maps * keep.to(maps.dtype)


def block_values(value: torch.Tensor, blk: Block) -> torch.Tensor:
    """V on the block's key slots, [B, h_kv, n, d] (slots outside the sequence repeat an edge
    slot; their weight is 0)."""
    return value.index_select(2, blk.col_slots.clamp(min=0, max=value.shape[2] - 1))


def apply_weights(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weights [B or 1, h, n, n] · values [B, h_kv, n, d] -> [B, h, n, d], in values' dtype.

    The h query heads are grouped over the h_kv value heads (head j reads value head j // g),
    so V is used in place rather than repeated g times.
    """
    batch, kv_heads, n, dim = values.shape
    heads = weights.shape[1]
    w = weights.to(values.dtype).expand(batch, heads, n, n).reshape(batch, kv_heads, (heads // kv_heads) * n, n)
    return torch.matmul(w, values).reshape(batch, heads, n, dim)


def add_rows(output: torch.Tensor, term: torch.Tensor, align: str) -> torch.Tensor:
    """output [B, q, h, d] + term [B, h, n, d] on the block's rows (out of place).

    The output is extended by n zero rows (after it for ``head``, before it for ``tail``) so
    that the block's n rows always exist, then cut back to q rows.
    """
    batch, q, heads, dim = output.shape
    n = term.shape[2]
    term = term.transpose(1, 2).to(output.dtype)
    if isinstance(q, int) and q >= n and not tracing():
        # eager, the block inside the queries: no padding rows needed. Without autograd the
        # base's fresh output takes the term in place (no copy); with it, one copy (the base
        # attention's backward may need its own output unchanged)
        first = 0 if align == "head" else q - n
        if not torch.is_grad_enabled() or not (output.requires_grad or term.requires_grad):
            output[:, first:first + n] += term
            return output
        return torch.cat([output[:, :first], output[:, first:first + n] + term, output[:, first + n:]], dim=1)
    # the general form: graphs (export, compile) keep one shape-independent path
    zeros = output.new_zeros(batch, n, heads, dim)
    if align == "tail":
        extended = torch.cat([zeros, output], dim=1)  # rows q..q+n-1 are the last n queries
        return torch.cat([extended[:, :q], extended[:, q:] + term], dim=1).narrow(1, n, q)
    extended = torch.cat([output, zeros], dim=1)  # rows 0..n-1 are the first n queries
    return torch.cat([extended[:, :n] + term, extended[:, n:]], dim=1).narrow(1, 0, q)


def add_to_weights(attn_weights: torch.Tensor, weights: torch.Tensor, blk: Block, q: int) -> torch.Tensor:
    """Eager only: the returned probabilities [B, h, q, L] + the block (``output_attentions`` shows Attn^)."""
    length = attn_weights.shape[-1]
    rows = (blk.row_slots - (length - q)).tolist()
    cols = blk.col_slots.tolist()
    r_in = [i for i, r in enumerate(rows) if 0 <= r < q]
    c_in = [j for j, c in enumerate(cols) if 0 <= c < length]
    if not r_in or not c_in:
        return attn_weights
    out = attn_weights.clone()
    r0, r1, c0, c1 = r_in[0], r_in[-1] + 1, c_in[0], c_in[-1] + 1
    rs, cs = slice(rows[r0], rows[r0] + r1 - r0), slice(cols[c0], cols[c0] + c1 - c0)
    out[:, :, rs, cs] = out[:, :, rs, cs] + weights[:, :, r0:r1, c0:c1].to(out.dtype)
    return out


def scores_bias(attention_mask: torch.Tensor, attn_s: torch.Tensor, heads: int, q: int, length: int,
                align: str) -> torch.Tensor:
    """The paper's ¬N: the additive mask [B, h, q, L] that puts Attn_s inside the softmax.

    This ablation does materialise a per-head bias over all L keys (the base attention takes
    it as its mask); the masked entries stay at the mask's minimum.
    """
    h_s, n = attn_s.shape[0], attn_s.shape[1]
    past = length - q
    if align == "tail":
        # slot s <-> map index s - (L - n): queries' rows n-q..n-1, keys' columns -(L-n)..n-1
        rows = torch.cat([attn_s.new_zeros(h_s, q, n), attn_s], dim=1).narrow(1, n, q)
        bias = torch.cat([rows.new_zeros(h_s, q, length), rows], dim=2).narrow(2, n, length)
    else:
        rows = torch.cat([attn_s, attn_s.new_zeros(h_s, length, n)], dim=1).narrow(1, past, q)
        bias = torch.cat([rows, rows.new_zeros(h_s, q, length)], dim=2).narrow(2, 0, length)
    bias = bias.repeat(heads // h_s, 1, 1)[None]
    if attention_mask.dtype == torch.bool:
        low = torch.finfo(bias.dtype).min
        attention_mask = torch.where(attention_mask, torch.zeros((), dtype=bias.dtype, device=bias.device), low)
    return attention_mask + bias.to(attention_mask.dtype)
