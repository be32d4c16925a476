"""Where the map Attn_s [h_s, n, n] lands in an attention map of q queries over L keys.

Positions are the key slots 0..L-1 of the attention map (what the paper indexes in eqs.
14-16). The q queries are the last q slots, L-q..L-1: without a cache q = L; with a KV cache
the new queries follow the L-q cached ones, so the query at absolute slot t reads row t of
the map against the keys 0..t, as it would in the uncached forward pass.

``head`` (eqs. 14-15): map index k ↔ slot k. With n ≤ L the map covers [:n, :n]; with n > L
it is cropped to [:L, :L].
``tail`` (eq. 16): map index k ↔ slot L - n + k, the last n tokens; with n > L the map is
cropped to its last L rows and columns, so the last token always reads the map's last row.

All sizes are plain arithmetic on the shapes (``torch.sym_min``), never on tensor values, so
the same code runs under ``torch.export`` with dynamic shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    """The block of the attention map that the map touches.

    rows: how many queries get a term; they are queries ``query_start .. query_start+rows-1``
        (in the q axis) and map rows ``map_row .. map_row+rows-1``.
    cols: how many keys; key slots ``key_start .. key_start+cols-1`` and map columns
        ``map_col .. map_col+cols-1``.
    """

    rows: int
    cols: int
    query_start: int
    key_start: int
    map_row: int
    map_col: int


def region(n: int, q: int, length: int, align: str) -> Region:
    """The :class:`Region` of an n×n map for q queries over ``length`` keys (q ≤ length)."""
    past = length - q
    cols = torch.sym_min(length, n)
    if align == "head":
        # queries at slots past..length-1; map rows are slots, so rows past..min(length, n)-1
        rows = torch.sym_max(cols - past, 0)
        return Region(rows=rows, cols=cols, query_start=0, key_start=0, map_row=torch.sym_min(past, n), map_col=0)
    rows = torch.sym_min(q, n)
    return Region(rows=rows, cols=cols, query_start=q - rows, key_start=length - cols,
                  map_row=n - rows, map_col=n - cols)


def causal_block(reg: Region, device) -> torch.Tensor:
    """bool [rows, cols]: map column ≤ map row (eq. 11, in map coordinates = slot order)."""
    rows = torch.arange(reg.rows, device=device) + reg.map_row
    cols = torch.arange(reg.cols, device=device) + reg.map_col
    return cols[None, :] <= rows[:, None]
