"""With a KV cache, the new query at absolute slot t reads row t of Attn_s against the cached
values 0..t: generation with the cache equals generation without it."""

from __future__ import annotations

import pytest
import torch

import modapt
from modapt.testing.models import tiny_gpt2, tiny_llama


def perturbed(model, registry, **opts):
    model = modapt.apply(model, {"adapter": [{"method": "lmam", **opts}]}, registry=registry)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, param in sorted(modapt.trainable_parameters(model).items()):
            param.add_(torch.randn(param.shape, generator=gen))
    return model


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_generation_equals_uncached(registry, factory, impl):
    # prompt 6 (left-padded by 2 in row 0), n = 9: the generated tokens cross the end of the map
    model = perturbed(factory(attn_implementation=impl), registry, heads=2, r=2, n=9, scale=0.5, init="random")
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    cached = model.generate(use_cache=True, **kwargs)
    uncached = model.generate(use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    modapt.remove(model)
    base = model.generate(use_cache=True, **kwargs)
    assert max((a - b).abs().max() for a, b in zip(cached.scores, base.scores)) > 1e-3, "LMAM changed nothing"


def test_decoding_step_reads_row_t(registry):
    """One cached step at slot t gives the same logits as the full forward's position t."""
    model = perturbed(tiny_llama(), registry, heads=1, r=2, n=12, init="random")
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        prefix = model(input_ids=ids[:, :7], use_cache=True)
        step = model(input_ids=ids[:, 7:8], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, 0], full[:, 7], atol=1e-5, rtol=0)
