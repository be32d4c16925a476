"""The block arithmetic, and the flash-attention plumbing (a 2D padding mask or none)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import AttentionInterface

import modapt
from modapt.testing.models import tiny_llama
from modapt_lmam.term import add_rows, block


def kept_pairs(n, q, length, align, causal=True):
    """{(query index, key slot, map row, map col)} that the block keeps, without a mask."""
    attn_s = torch.arange(n * n, dtype=torch.float32).reshape(1, n, n)
    blk = block(attn_s, q, length, None, causal=causal, align=align)
    # block rows are the first n queries (head) or the last n (tail)
    first = 0 if align == "head" else q - n
    out = set()
    for i in range(n):
        for j in range(n):
            if blk.keep[0, 0, i, j] and 0 <= first + i < q:  # other rows are cut off by add_rows
                value = int(blk.maps[0, i, j])
                out.add((first + i, int(blk.col_slots[j]), value // n, value % n))
    return out


def expected_pairs(n, q, length, align, causal=True):
    """The same set from the paper's placement, written per slot."""
    offset = 0 if align == "head" else length - n
    out = set()
    for i in range(q):
        slot = length - q + i
        for key in range(length):
            row, col = slot - offset, key - offset
            if 0 <= row < n and 0 <= col < n and (not causal or key <= slot):
                out.add((i, key, row, col))
    return out


SIZES = [
    (4, 8, 8), (8, 8, 8), (12, 8, 8),   # n < N, n = N, n > N (crop)
    (4, 1, 3), (4, 1, 4), (4, 1, 9),    # one cached decoding step, inside / at / past the map
    (4, 3, 6), (6, 2, 5),               # a chunk after a cache
]
# encoders (causal = False) have no cache: only q = L
CASES = [(*size, causal) for size in SIZES for causal in (True, False) if causal or size[1] == size[2]]


@pytest.mark.parametrize("n, q, length, causal", CASES)
@pytest.mark.parametrize("align", ["head", "tail"])
def test_block_placement(n, q, length, causal, align):
    assert kept_pairs(n, q, length, align, causal) == expected_pairs(n, q, length, align, causal)


@pytest.mark.parametrize("q, n", [(6, 4), (4, 4), (3, 5)])   # block inside, equal, longer than the queries
@pytest.mark.parametrize("align", ["head", "tail"])
@pytest.mark.parametrize("grad", [False, True])
def test_add_rows(q, n, align, grad):
    """output [B, q, h, d] + term [B, h, n, d] on the first (head) or last (tail) n query rows;
    the eager in-place (no grad), one-copy (grad) and padded (q < n) forms all agree with it."""
    torch.manual_seed(0)
    output = torch.randn(2, q, 3, 4, requires_grad=grad)
    term = torch.randn(2, 3, n, 4, requires_grad=grad)
    expected = output.detach().clone()
    rows = min(q, n)
    t = term.detach().transpose(1, 2)
    if align == "head":
        expected[:, :rows] += t[:, :rows]
    else:
        expected[:, q - rows:] += t[:, n - rows:]
    with torch.set_grad_enabled(grad):
        got = add_rows(output if grad else output.detach().clone(), term, align)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if grad:
        got.sum().backward()
        torch.testing.assert_close(output.grad, torch.ones_like(output))
        weight = torch.zeros(n)
        weight[:rows] = 1 if align == "head" else 0
        if align == "tail":
            weight[n - rows:] = 1
        torch.testing.assert_close(term.grad, weight[None, None, :, None].expand_as(term))


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
