"""LoRMAπ's ``weight`` path: one GEMM with W* = T·W0 (pre) or W0·T (post) instead of W0 x then T(W0 x).

Per call (N tokens, W0 [out, in], T = s·Iπ(BA) [d, d], d = out for pre, in for post)::

    forward:   T = s·Iπ(BA)                         r·d²       (rebuilt, never saved)
               W* = T·W0  |  W0·T                   out·in·d
               y = x W*ᵀ + b                        N·out·in   (replaces the base GEMM)
    backward:  ∂x = ∂y W*                           N·out·in
               ∂W* = ∂yᵀ x                          N·out·in
               ∂T = ∂W* W0ᵀ  |  W0ᵀ ∂W*             out·in·d
               ∂(BA) = s·Iπ⁻¹(∂T); ∂B = ∂(BA) Aᵀ, ∂A = Bᵀ ∂(BA)    2·r·d²

The work on W* does not grow with N, so for many tokens and a wide T this is far cheaper than
the direct path's 3·N·d² (see :mod:`modapt_lorma.pi_path`).

Why a custom autograd Function: autograd on ``F.linear(x, (T @ W0.float()).to(x.dtype))``
would keep W* *and* an fp32 copy of W0 (the right operand of T @ W0) per layer, plus T
(d×d fp32, 127 MB for a 5632-wide T) through the rotation. Here backward keeps x, A, B and
(``recompute=False``, the default: see the README's measurements) W* in the GEMM dtype; W0
is read from the layer again, and T is rebuilt from A and B (r·d², cheap).

Dtypes follow the direct path: T is built in the parameters' dtype (float32 for fp32
adapters on a bf16 base), or in the autocast dtype under autocast; the N-token GEMMs run in
the dtype the base layer runs in (its weight's dtype, or the autocast dtype). W* for a float32
T over a half base comes from one half GEMM over T's two half parts (:func:`_weight`), so the
forward is the merged layer's (``merge`` builds T·W0 in float32) up to ~2⁻¹⁷ of T and W*'s rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from modapt import fast_path_switches
from modapt.float32_gemm import mm_float32

from .inflation import _rotate


def pi_weight_linear(x: torch.Tensor, lorma_a: torch.Tensor, lorma_b: torch.Tensor, scaling: float,
                     w0: torch.Tensor, bias: torch.Tensor | None, side: str,
                     recompute: bool = False) -> torch.Tensor:
    """``x W*ᵀ + b`` for x [..., in], W* = s·Iπ(BA)·W0 (pre) or W0·s·Iπ(BA) (post): [..., out].

    ``w0`` is the canonical base weight [out, in] (frozen: it gets no gradient); A [r, d],
    B [d, r]; gradients flow to x, A, B (and ``bias`` if it requires grad). ``recompute``
    rebuilds W* in backward instead of keeping it (out·in·d more work, one weight copy less).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        build_dtype = gemm_dtype = torch.get_autocast_dtype(device_type)
    else:
        build_dtype, gemm_dtype = lorma_a.dtype, w0.dtype
        # experiment switch, off: modapt.fast_paths(lorma_build_in_base_dtype=True) builds T and W* in a
        # bf16/fp16 base's dtype (faster build GEMMs on a GPU, but T ≈ I in bf16 loses diagonal changes
        # below 2⁻⁸, README); benchmarks/bench_lorma.py measures it as lorma-pi-weight-basedtype
        if fast_path_switches.current.lorma_build_in_base_dtype and w0.dtype.itemsize < lorma_a.dtype.itemsize:
            build_dtype = w0.dtype
    with torch.autocast(device_type, enabled=False):
        return _PiWeightLinear.apply(x, lorma_a, lorma_b, w0, bias, scaling, side == "pre", recompute,
                                     build_dtype, gemm_dtype)


def _t_matrix(a, b, scaling, dtype):
    """s·Iπ(BA) [d, d] in ``dtype``: a strided view of s·[BA, BA] [d, 2d] (see ``inflation.rotate_rows``).

    B·(s·[A, A]) gives the doubled matrix in one GEMM (2·r·d², s applied to the small factor),
    so the transient is that one [d, 2d] buffer: no separate BA, rotated copy or scaled copy.
    GEMMs take the view as it is (row stride 2d − 1).
    """
    d = a.shape[1]
    doubled = (b @ (torch.cat([a, a], dim=1) * scaling)).to(dtype)
    return doubled.as_strided((d, d), (2 * d - 1, 1), doubled.storage_offset() + d)


def _weight(t, w0, pre, build_dtype, gemm_dtype):
    """W* = T·W0 (pre) or W0·T (post) [out, in] in ``gemm_dtype``.

    A float32 T over a half W0 (fp32 adapters on a bf16 base): T is split into two half parts,
    T = T_hi + T_lo (T_hi = half(T), T_lo = half(T − T_hi): ~16 of float32's 24 mantissa bits),
    and W* = [T_hi, T_lo]·[W0; W0] (or [W0, W0]·[T_hi; T_lo]) is one half GEMM over twice the inner
    size: the products of half values are exact in its float32 accumulator and W* is rounded once,
    so W* is the float32 build's to ~2⁻¹⁷ of T, for any T (near the identity or not), while the
    out·in·d work runs on the half tensor cores instead of the float32 units (H200, 1B: those
    float32 GEMMs were ~350 of LoRMAπ's 525 ms of kernels a step; README "Dtypes").
    """
    if build_dtype == torch.float32 and gemm_dtype in (torch.bfloat16, torch.float16) and w0.dtype == gemm_dtype:
        hi = t.to(gemm_dtype)
        lo = (t - hi.float()).to(gemm_dtype)
        if pre:
            return torch.cat([hi, lo], dim=1) @ torch.cat([w0, w0], dim=0)
        return torch.cat([w0, w0], dim=1) @ torch.cat([hi, lo], dim=0)
    w0 = w0.to(build_dtype)
    return (t @ w0 if pre else w0 @ t).to(gemm_dtype)


def _grad_t(grad_w, w0, pre, build_dtype):
    """∂T = ∂W*·W0ᵀ (pre) or W0ᵀ·∂W* (post) [d, d] in ``build_dtype`` from ∂W* [out, in] in the GEMM dtype.

    ∂W* is a half GEMM's output; multiplied with the half W0 in one GEMM with float32 output
    (:func:`modapt.float32_gemm.mm_float32`, CUDA) the products are exact and the sums float32, as
    the float32 GEMM over their upcast copies computes, without the two out×in float32 copies and
    on the half tensor cores.
    """
    if build_dtype == torch.float32 and grad_w.dtype in (torch.bfloat16, torch.float16) and w0.dtype == grad_w.dtype:
        out = mm_float32(grad_w, w0.t()) if pre else mm_float32(w0.t(), grad_w)
        if out is not None:
            return out
    grad_w = grad_w.to(build_dtype)
    w0b = w0.to(build_dtype)
    return grad_w @ w0b.t() if pre else w0b.t() @ grad_w


class _PiWeightLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, w0, bias, scaling, pre, recompute, build_dtype, gemm_dtype):
        x_gemm = x.to(gemm_dtype)  # what the base layer's GEMM (and its backward) would see
        with torch.no_grad():
            w_star = _weight(_t_matrix(a, b, scaling, build_dtype), w0, pre, build_dtype, gemm_dtype)
            out = F.linear(x_gemm, w_star, None if bias is None else bias.to(gemm_dtype))
        ctx.scaling, ctx.pre, ctx.recompute = scaling, pre, recompute
        ctx.build_dtype, ctx.gemm_dtype, ctx.x_dtype = build_dtype, gemm_dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # w0 is an input (the frozen weight or its view): saving it copies nothing, and an in-place
        # change of W0 before backward (a merge) is caught by autograd's version check
        ctx.save_for_backward(x_gemm, a, b, w0, None if recompute else w_star)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, a, b, w0, w_star = ctx.saved_tensors
        pre = ctx.pre
        need_x, need_a, need_b, _, need_bias = ctx.needs_input_grad[:5]
        grad = grad.to(ctx.gemm_dtype)
        grad_x = grad_a = grad_b = grad_bias = None
        if need_x:
            if w_star is None:
                t = _t_matrix(a, b, ctx.scaling, ctx.build_dtype)
                w_star = _weight(t, w0, pre, ctx.build_dtype, ctx.gemm_dtype)
            grad_x = (grad @ w_star).to(ctx.x_dtype)
        del w_star
        if need_a or need_b:
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])                            # [out, in]
            grad_t = _grad_t(grad_w, w0, pre, ctx.build_dtype)                      # [d, d]
            grad_m = _rotate(grad_t.to(a.dtype), -1)                                # ∂(BA) / s, a view
            grad_a = (b.t() @ grad_m) * ctx.scaling if need_a else None
            grad_b = (grad_m @ a.t()) * ctx.scaling if need_b else None
        if need_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_a, grad_b, None, grad_bias, None, None, None, None, None
