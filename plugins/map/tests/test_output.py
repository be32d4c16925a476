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


def test_quantized_base_backward_works_in_the_compute_dtype():
    """k-bit preparation leaves x in float32 while a 4-bit layer computes in bf16: g W0 and the
    stored u must be formed in bf16 (as bitsandbytes' own backward does), never as a float32
    GEMM over the whole weight; the gradients still equal float64 autograd within bf16 error."""
    bnb = pytest.importorskip("bitsandbytes")
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    plain = nn.Linear(64, 48, bias=True)
    q = bnb.nn.Linear4bit(64, 48, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.load_state_dict(plain.state_dict())
    q = q.to("cpu").requires_grad_(False)  # quantizes on the move
    w0 = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).double()  # [48, 64]
    bias = q.bias.detach().double()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=gen, requires_grad=True)
    u = torch.randn(3, 5, 48, generator=gen, requires_grad=True)
    a = torch.tensor(0.8, requires_grad=True)
    b = torch.tensor(-1.3, requires_grad=True)
    g = torch.randn(3, 5, 48, generator=gen)

    class GemmDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.matmul.default):
                if 48 in args[0].shape and 64 in args[1].shape:  # g [N, out] @ W0 [out, in]
                    self.seen.append((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    y = map_output(x, u, a, b, q(x), q)
    assert y.dtype == torch.float32
    mode = GemmDtypes()
    with mode:
        y.backward(g)
    assert mode.seen and all(pair == (torch.bfloat16, torch.bfloat16) for pair in mode.seen), mode.seen

    # the formula in float64 over the same dequantized W0: y = a·(W0 x) + b·u + bias
    xd, ud = x.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    (ad * (xd @ w0.t()) + bd * ud + bias).backward(g.double())
    for ours, ref in ((x.grad, xd.grad), (u.grad, ud.grad), (a.grad, ad.grad), (b.grad, bd.grad)):
        scale = ref.abs().max().item()
        assert (ours.double() - ref).abs().max().item() <= 2e-2 * scale
