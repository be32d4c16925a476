"""modapt.float32_gemm: one half GEMM with a float32 result where the device has it, else None."""

import pytest
import torch
from modapt import float32_gemm
from modapt.float32_gemm import mm_float32
from modapt.testing.float32_gemm import emulate_float32_mm


def operands():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(6, 40, generator=gen).to(torch.bfloat16),
            torch.randn(40, 5, generator=gen).to(torch.bfloat16))


def test_this_cpu_refuses_it_once_and_it_is_remembered(monkeypatch):
    monkeypatch.setattr(float32_gemm, "_AVAILABLE", {})
    p, q = operands()
    try:
        torch.mm(p, q, out_dtype=torch.float32)
        pytest.skip("this torch build has the float32-output GEMM on the CPU")
    except (RuntimeError, TypeError):
        pass
    assert float32_gemm.available("cpu") is None
    assert mm_float32(p, q) is None
    assert float32_gemm.available("cpu") is False
    assert mm_float32(p, q) is None


@pytest.mark.parametrize("supported", [True, False])
def test_float32_result_equals_the_exact_products_summed(monkeypatch, supported):
    calls = emulate_float32_mm(monkeypatch, supported)
    p, q = operands()
    for _ in range(2):
        out = mm_float32(p, q)
        if not supported:
            assert out is None
            continue
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), p.double() @ q.double(), rtol=1e-6, atol=1e-5)
    assert calls == [torch.float32] * (2 if supported else 1)
    assert float32_gemm.available("cpu") is supported
