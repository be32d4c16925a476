"""LMAM's output equals an explicit eager computation that materialises softmax(QKᵀ/√d) + Attn_s.

The reference below is written independently of the plugin: it builds P_a, P_b from eq. 7,
Attn_s from eq. 10, places it in an L×L matrix element by element (eqs. 14-16), masks it with
the causal triangle (eq. 11) and the padding of the 2D attention mask, and multiplies the
full map by V. It is plugged into the same model as an attention implementation, so the two
runs share every other layer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import masking_utils
from transformers.modeling_utils import AttentionInterface

import modapt
from modapt.testing.models import tiny_bert, tiny_gpt2, tiny_llama

REFERENCE = "lmam_test_reference"
CURRENT: dict = {}


def positional(n):
    return torch.tensor([1.0 / 10000 ** (2 * pos / n) for pos in range(n)], dtype=torch.float64).float()


def reference_map(module, opts):
    """Attn_s [h_s, n, n] written out from the paper's equations."""
    n, s = opts["n"], opts.get("scale", 1.0)
    if opts.get("full_rank"):
        return module.lmam_W.detach() * s
    wa, wb = module.lmam_Wa.detach(), module.lmam_Wb.detach()
    if opts.get("position", True):
        pe = positional(n)
        wa = wa + pe[None, :, None]
        wb = wb + pe[None, None, :]
    return torch.einsum("hir,hrj->hij", wa, wb) * s


def reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    opts, mask2d = CURRENT["options"], CURRENT["mask2d"]
    batch, heads, q, _ = query.shape
    length = key.shape[2]
    group = heads // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    causal = CURRENT["causal"]
    allowed = torch.zeros(batch, 1, q, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(q):
            slot = length - q + i
            for j in range(length):
                allowed[b, 0, i, j] = bool(mask2d[b, j]) and (not causal or j <= slot)
    attn_s = reference_map(module, opts)
    h_s, n = attn_s.shape[0], attn_s.shape[1]
    offset = 0 if opts.get("align", "head") == "head" else length - n  # map index k <-> slot offset + k
    full = torch.zeros(heads, q, length)
    for head in range(heads):
        for i in range(q):
            for j in range(length):
                a, c = length - q + i - offset, j - offset
                if 0 <= a < n and 0 <= c < n:
                    full[head, i, j] = attn_s[head % h_s, a, c]
    in_map = full != 0
    low = torch.finfo(scores.dtype).min
    variant = opts.get("nonnegative", False)
    if variant is True:
        probs = (scores + full[None]).masked_fill(~allowed, low).softmax(-1)
        attn = probs
    elif variant == "softmax":
        probs = scores.masked_fill(~allowed, low).softmax(-1)
        keep = allowed & in_map[None]
        side = torch.where(keep, full[None].expand_as(probs).masked_fill(~keep, low).softmax(-1), 0.0)
        attn = probs + side
    else:
        probs = scores.masked_fill(~allowed, low).softmax(-1)
        attn = probs + full[None] * allowed
    return (attn @ v).transpose(1, 2), attn


AttentionInterface.register(REFERENCE, reference_attention)
masking_utils.AttentionMaskInterface.register(REFERENCE, masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"])

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def inputs(seq: int, padding: str):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, seq), generator=gen)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[0, -3:] = 0
    elif padding == "left":
        mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def compare(registry, family, opts, *, seq=8, padding="right", impl="eager", **model_kwargs):
    task = "feature-extraction" if family == "bert" else "causal-lm"  # BERT: every token's hidden state
    model = FACTORIES[family](task=task, attn_implementation=impl, **model_kwargs)
    model = modapt.apply(model, {"adapter": [{"method": "lmam", **opts}]}, registry=registry)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(modapt.trainable_parameters(model).items()):
            param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    batch = inputs(seq, padding)
    with torch.no_grad():
        ours = main_output(model(**batch))
        config = model.config
        switched = config._attn_implementation_internal
        CURRENT.update(options=opts, mask2d=batch["attention_mask"], causal=family != "bert")
        config._attn_implementation_internal = REFERENCE
        try:
            reference = main_output(model(**batch))
        finally:
            config._attn_implementation_internal = switched
        modapt.remove(model)
        base = main_output(model(**batch))
    assert (reference - base).abs().max() > 1e-3, "the adapter changes nothing: the test would not see a bug"
    # a left-padded query slot attends to no key at all; what the base gives there (eager: uniform,
    # SDPA: its own convention) is not LMAM's business, so only real query positions are compared
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], reference[real], atol=1e-5, rtol=0)


CASES = {
    "n<N": dict(n=5, r=2),
    "n=N": dict(n=8, r=3),
    "n>N": dict(n=12, r=2),
    "tail": dict(n=5, r=2, align="tail"),
    "tail n>N": dict(n=12, r=2, align="tail"),
    "h_s=1": dict(n=6, r=2, heads=1),
    "h_s=2": dict(n=6, r=2, heads=2),
}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_explicit_map(registry, family, case):
    compare(registry, family, {**CASES[case], "scale": 0.7, "init": "random"})


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_padding_and_sdpa_base(registry, family, padding):
    compare(registry, family, dict(n=6, r=2, heads=2, init="random"), padding=padding, impl="sdpa")


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("variant", [
    dict(position=False), dict(full_rank=True), dict(nonnegative=True), dict(nonnegative="softmax"),
    dict(nonnegative="softmax", align="tail"), dict(nonnegative=True, align="tail", n=12),
])
def test_ablations_match(registry, family, variant):
    compare(registry, family, {"n": 6, "r": 2, "heads": 2, "init": "random", **variant})


def test_grouped_query_heads_one_kv_head(registry):
    compare(registry, "llama", dict(n=6, r=2, heads=2, init="random"), num_key_value_heads=1)
