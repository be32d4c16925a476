"""The hand-written backward of the MAP output against autograd's, in float64 (gradcheck)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from modapt_map.output import map_output


def layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    module = {"linear": lambda: nn.Linear(6, 5), "conv1d": lambda: Conv1D(5, 6),
              "embedding": lambda: nn.Embedding(7, 5)}[kind]().double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module.requires_grad_(False)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_gradients_match_autograd(kind):
    base = layer(kind)
    gen = torch.Generator().manual_seed(1)
    if kind == "embedding":
        x = torch.randint(0, 7, (2, 3), generator=gen)
    else:
        x = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)

    def ours(*args):
        xx = args[0] if kind != "embedding" else x
        return map_output(xx, args[-3], args[-2], args[-1], base(xx), base)

    inputs = (u, a, b) if kind == "embedding" else (x, u, a, b)
    assert torch.autograd.gradcheck(ours, inputs)

    def plain(*args):
        xx = args[0] if kind != "embedding" else x
        out = base(xx)
        bias = getattr(base, "bias", None)
        w0_x = out if bias is None else out - bias
        return a_ * w0_x + (0 if bias is None else bias) + b_ * u_

    # and the same numbers as the formula written out
    g = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(ours(*inputs), inputs, g)
    a_, b_, u_ = a, b, u
    want = torch.autograd.grad(plain(*inputs), inputs, g)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-12, atol=1e-12)
