"""The factored row norm equals ‖W0 + L R‖_row computed directly (float64 reference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modapt
import modapt.lora
import modapt_dora.plugin
from modapt.testing import tiny_inputs, tiny_llama
from modapt.testing.conformance import perturb
from modapt_dora.norm import BaseRowNormCache, base_row_norm_sq, factored_row_norm, rows_times


def factors(out_f=96, in_f=64, k=8, rho=0.1, seed=0, dtype=torch.float32):
    """W0 [out, in] in ``dtype``, L [out, k], R [k, in] float32 with ‖L R‖_row ≈ rho · ‖W0‖_row."""
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(dtype)
    left = torch.randn(out_f, k, generator=gen)
    right = torch.randn(k, in_f, generator=gen) / (k * in_f) ** 0.5 * rho
    return w0, left, right


def reference(w0, left, right):
    return (w0.double() + left.double() @ right.double()).norm(dim=1)


@pytest.mark.parametrize("rho", [1e-3, 1e-1, 1.0, 10.0])
def test_factored_norm_equals_direct_norm_fp32(rho):
    w0, left, right = factors(rho=rho)
    got = factored_row_norm(w0, base_row_norm_sq(w0), left, right)
    want = reference(w0, left, right)
    assert got.dtype == torch.float32
    assert ((got.double() - want) / want).abs().max() < 2e-6


@pytest.mark.parametrize("rho", [1e-2, 1e-1, 1.0])
def test_factored_norm_bf16_base(rho):
    """A bfloat16 W0 (exact as it is stored) with float32 factors: the norm is float32-accurate."""
    w0, left, right = factors(rho=rho, dtype=torch.bfloat16)
    got = factored_row_norm(w0, base_row_norm_sq(w0), left, right)
    want = reference(w0, left, right)
    assert ((got.double() - want) / want).abs().max() < 2e-6


def test_rows_times_half_precision_is_float32_accurate():
    """Split product (CUDA) or upcast (CPU): W0 Rᵀ as accurate as float32, unlike a plain
    bfloat16 product of W0 and a rounded R."""
    w0, _, right = factors(dtype=torch.bfloat16)
    got = rows_times(w0, right)
    want = w0.double() @ right.double().t()
    naive = (w0 @ right.to(torch.bfloat16).t()).double()
    scale = want.abs().max()
    assert (got.double() - want).abs().max() < 1e-6 * scale
    assert (naive - want).abs().max() > 1e-4 * scale


@pytest.mark.parametrize("eta", [1e-1, 1e-2, 1e-3])
def test_rows_where_delta_cancels_w0_are_recomputed(eta):
    """A row with ‖W0 + ΔW‖ = eta · ‖W0‖: the expanded sum alone loses ~eps/eta² (0.4 at
    eta = 1e-3, 2048 wide); the refined rows keep it float32-accurate."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(64, 512, generator=gen) / 512**0.5
    left = torch.zeros(64, 1)
    left[0, 0] = -(1 - eta)
    right = w0[:1].clone()
    want = reference(w0, left, right)
    got = factored_row_norm(w0, base_row_norm_sq(w0), left, right)
    assert ((got.double() - want) / want).abs().max() < 1e-5
    plain = factored_row_norm(w0, base_row_norm_sq(w0), left, right, refined_rows=0)
    if eta <= 1e-2:  # the unrefined sum really is worse there (the test can fail)
        assert abs(plain[0].double() - want[0]) / want[0] > 1e-4


def test_base_norm_cache_follows_the_weight():
    layer = nn.Linear(8, 6)
    cache = BaseRowNormCache()
    first = cache.get(layer.weight, layer.weight).clone()
    assert cache.get(layer.weight, layer.weight) is cache.get(layer.weight, layer.weight)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    torch.testing.assert_close(cache.get(layer.weight, layer.weight), 4 * first)
    layer.to(torch.bfloat16)
    assert cache.get(layer.weight, layer.weight).dtype == torch.float32


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    modapt_registry.register_plugin(modapt_dora.plugin, name="dora", distribution="modapt-dora")
    return modapt_registry


def test_live_layers_use_the_factored_norm_and_it_equals_the_direct_one(registry):
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "dora", "targets": ["q_proj", "embed_tokens"]}]},
                         registry=registry)
    perturb(model, scale=0.5)
    for path, host in modapt.state_of(model).layers.items():
        w0 = modapt.update.canonical_weight(host).double()
        left, right = host.update.factors()
        want = (w0 + left.double() @ right.double()).norm(dim=1)
        torch.testing.assert_close(host.reparam.row_norm().double(), want, rtol=2e-6, atol=0)


def test_update_without_factors_falls_back_to_delta_weight(registry):
    recipe = {"adapter": [{"method": "dora", "targets": ["q_proj", "down_proj"]}]}
    fast = modapt.apply(tiny_llama(), recipe, registry=registry)
    perturb(fast, scale=0.5)
    slow = modapt.apply(tiny_llama(), recipe, registry=registry)
    slow.load_state_dict(fast.state_dict())
    for host in modapt.state_of(slow).layers.values():
        update = host.update  # an update with no low-rank form: ΔW is built
        update.factors = lambda: None
        update.delta_weight = lambda w0, h=host, s=update.scaling: (h.lora_B.weight @ h.lora_A.weight * s).to(w0.dtype)
        assert host.update.factors() is None
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(slow(**inputs).logits, fast(**inputs).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("supported", [True, False])
def test_rows_times_split_product_on_a_half_w0(monkeypatch, supported):
    """W0 Rᵀ for a bf16 W0 and float32 R: with the float32-output GEMM (CUDA's; emulated) R is split
    into two bf16 parts (~16 bits kept) and W0 read once, else W0 is upcast; both near the float64 product."""
    from modapt.testing.float32_gemm import emulate_float32_mm
    from modapt_dora.norm import split_product_available

    calls = emulate_float32_mm(monkeypatch, supported)
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(24, 64, generator=gen).to(torch.bfloat16)
    right = torch.randn(4, 64, generator=gen)
    got = rows_times(w0, right)
    want = w0.double() @ right.double().t()
    assert got.dtype == torch.float32 and got.shape == (24, 4)
    assert float((got.double() - want).abs().max() / want.abs().max()) < (2e-5 if supported else 1e-6)
    assert calls == [torch.float32]
    assert split_product_available("cpu") is supported
