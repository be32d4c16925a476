"""The block arithmetic, and the flash-attention plumbing (a 2D padding mask or none)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import AttentionInterface

import modapt
from modapt.testing.models import tiny_llama
from modapt_lmam.region import Region, region


@pytest.mark.parametrize("args, expected", [
    # n, q, L, align -> rows, cols, query_start, key_start, map_row, map_col
    ((4, 8, 8, "head"), Region(4, 4, 0, 0, 0, 0)),       # n < N: [:n, :n]
    ((12, 8, 8, "head"), Region(8, 8, 0, 0, 0, 0)),      # n > N: cropped to [:N, :N]
    ((4, 1, 3, "head"), Region(1, 3, 0, 0, 2, 0)),       # cached step at slot 2 reads row 2
    ((4, 1, 6, "head"), Region(0, 4, 0, 0, 4, 0)),       # slot 5 >= n: nothing
    ((4, 8, 8, "tail"), Region(4, 4, 4, 4, 0, 0)),       # last n tokens
    ((12, 8, 8, "tail"), Region(8, 8, 0, 0, 4, 4)),      # n > N: the map's last N rows/cols
    ((4, 1, 9, "tail"), Region(1, 4, 0, 5, 3, 0)),       # cached step: the last row, last 4 keys
])
def test_region(args, expected):
    assert region(*args) == expected


def fake_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A pure-torch stand-in with flash attention's interface: a 2D padding mask [B, L] or None."""
    CALLS.append(None if attention_mask is None else tuple(attention_mask.shape))
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    q, length = query.shape[2], key.shape[2]
    allowed = torch.ones(q, length, dtype=torch.bool).tril(length - q)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2), None


CALLS: list = []


@pytest.mark.parametrize("padded", [False, True])
def test_flash_base_gets_a_2d_mask_and_matches_eager(registry, monkeypatch, padded):
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", fake_flash)
    recipe = {"adapter": [{"method": "lmam", "heads": 2, "n": 6, "init": "random", "scale": 0.5}]}
    eager = modapt.apply(tiny_llama(), recipe, registry=registry)
    flash = tiny_llama()
    flash.config._attn_implementation_internal = "flash_attention_2"
    flash = modapt.apply(flash, recipe, registry=registry)
    assert flash.config._attn_implementation == "lmam+flash_attention_2"
    flash.load_state_dict(eager.state_dict())
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -3:] = 0
    CALLS.clear()
    with torch.no_grad():
        got = flash(input_ids=ids, attention_mask=mask).logits
        want = eager(input_ids=ids, attention_mask=mask).logits
    assert CALLS and all(c == ((2, 8) if padded else None) for c in CALLS)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    modapt.remove(flash)
    assert flash.config._attn_implementation == "flash_attention_2"


def test_nonnegative_needs_scores(registry, monkeypatch):
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", fake_flash)
    model = tiny_llama()
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(modapt.RecipeError, match="flash attention"):
        modapt.apply(model, {"adapter": [{"method": "lmam", "nonnegative": True}]}, registry=registry)
