"""Row norms of the adapted weight, ‖W0 + ΔW‖_row, without building W0 + ΔW when ΔW is low-rank.

With ΔW = L R (L [out, k], R [k, in], scaling included, from ``Update.factors()``)::

    ‖W0 + L R‖²_row = ‖W0‖²_row + 2 · rowsum((W0 Rᵀ) ⊙ L) + rowsum((L (R Rᵀ)) ⊙ L)
       [out]            [out]            [out, k]               [out, k]

``‖W0‖²_row`` depends on the frozen base only and is cached (:class:`BaseRowNormCache`);
``W0 Rᵀ`` is one thin out×in×k matmul (it reads W0 once, like a forward of k tokens); the
rest is out×k and k×k work. Everything is computed in float32 with autocast off: the norm is
a constant of the step (detached, DoRA §4.3), so it is computed under ``no_grad`` and keeps
nothing for the backward.

Precision: the three terms are summed, so the absolute error is about
``eps · (‖W0‖² + 2|cross| + ‖ΔW‖²)`` and the relative error of the norm about
``eps/2 · (‖W0‖² + 2|cross| + ‖ΔW‖²) / ‖W0 + ΔW‖²``; it only grows where ΔW nearly cancels a
row of W0, and the few rows where it does most are recomputed directly (README, "Precision",
has the measured figures).
"""

from __future__ import annotations

import torch
from modapt import float32_gemm
from modapt.float32_gemm import mm_float32


@torch.no_grad()
def direct_row_norm(w0: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """‖W0 + ΔW‖ of every row, [out] float32, from W0 [out, in] and ΔW [out, in] (or None).

    Builds the out×in sum in float32: the reference, the merge path, and the path of updates
    without ``factors()``.
    """
    weight = w0.float() if delta is None else w0.float() + delta.float()
    return torch.linalg.vector_norm(weight, dim=1)


@torch.no_grad()
def base_row_norm_sq(w0: torch.Tensor) -> torch.Tensor:
    """‖W0‖²_row, [out] float32, for W0 [out, in] of any floating dtype."""
    return torch.linalg.vector_norm(w0, dim=1, dtype=torch.float32).square()


@torch.no_grad()
def rows_times(w0: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """W0 Rᵀ, [out, k] float32, from W0 [out, in] (any dtype) and R [k, in] float32.

    A float32 W0 is multiplied as is. For a half-precision W0, where the device multiplies
    half inputs into a float32 output (``torch.mm(..., out_dtype=float32)``, CUDA), W0 is not
    upcast (that would write an out×in float32 copy every step): R is split as R_hi + R_lo,
    both in W0's dtype (R keeps ~16 mantissa bits), and one matmul W0 [R_hi; R_lo]ᵀ reads W0
    once; the products are exact and only the float32 accumulation rounds. Elsewhere (CPU)
    W0 is upcast to float32 for this product.
    """
    right = right.float()
    if w0.dtype in (torch.float32, torch.float64):
        return (w0 @ right.t().to(w0.dtype)).float()
    if float32_gemm.available(w0.device.type) is not False:  # the split only where the GEMM may run
        hi = right.to(w0.dtype)
        lo = (right - hi.float()).to(w0.dtype)
        prod = mm_float32(w0, torch.cat([hi, lo]).t())  # [out, 2k]
        if prod is not None:
            k = right.shape[0]
            return prod[:, :k] + prod[:, k:]
    return w0.float() @ right.t()


def split_product_available(device_type: str) -> bool | None:
    """Whether :func:`rows_times` used the split half-precision product on this device type
    (``None``: not tried yet). The benchmark prints it."""
    return float32_gemm.available(device_type)


#: rows per layer whose norm is recomputed directly (those where ΔW cancels most of W0)
REFINED_ROWS = 32

#: the largest out·in for which a CUDA layer takes the direct norm (above it: factored): 2²⁴, so
#: every layer of the 135M and ~1B shapes (2048×5632 = 1.2·2²³) goes direct, and the factored
#: form is left to 4096-wide and larger layers
DIRECT_MAX_ELEMENTS = 1 << 24


def direct_is_cheaper(w0: torch.Tensor) -> bool:
    """Whether :func:`direct_factor_norm` is the path for this W0 [out, in].

    The direct norm is 3 kernels (cast, ``addmm``, norm) but moves ~18 bytes per weight (bf16
    W0 read, an out×in float32 written, read back); the factored one moves ~2 (W0 read once)
    in ~20 small kernels (~30 with the refined rows). Where the host issuing kernels sets the
    step time, kernels cost more than bytes: at the 135M shape, and at the ~1B shape too (the
    README's measurement history has the figures).
    Layers above :data:`DIRECT_MAX_ELEMENTS` (7B-class widths), where the kernels are long
    enough to hide the host, keep the factored form.
    """
    return w0.device.type != "cuda" or w0.shape[0] * w0.shape[1] <= DIRECT_MAX_ELEMENTS


@torch.no_grad()
def direct_factor_norm(w0: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """‖W0 + L R‖_row [out] float32 from W0 [out, in] (any dtype), L [out, k], R [k, in] float32.

    W0 + L R is built once in float32 (``addmm``, in place on the upcast copy of a half W0)
    and its rows' norms taken: the reference numerics, in three kernels.
    """
    if left.dtype != torch.float32 or right.dtype != torch.float32:
        left, right = left.float(), right.float()
    if w0.dtype == torch.float32:
        weight = torch.addmm(w0, left, right)
    else:
        weight = w0.float().addmm_(left, right)
    return torch.linalg.vector_norm(weight, dim=1)


@torch.no_grad()
def factored_row_norm(w0: torch.Tensor, w0_sq: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                      refined_rows: int = REFINED_ROWS) -> torch.Tensor:
    """‖W0 + L R‖_row, [out] float32, never building an out×in matrix.

    w0: W0 [out, in]; w0_sq: ‖W0‖²_row [out] float32 (cached); left: L [out, k]; right: R [k, in].

    The expanded sum loses accuracy where ΔW cancels a row of W0 (‖W0 + ΔW‖² ≪ ‖W0‖²). The
    ``refined_rows`` rows with the smallest ‖W0 + ΔW‖²/‖W0‖² are therefore recomputed directly
    from their rows of W0 (refined_rows × in × k work, chosen with ``topk``: no host sync).
    """
    left, right = left.float(), right.float()
    cross = (rows_times(w0, right) * left).sum(dim=1)  # rowdot(W0, L R)
    delta_sq = ((left @ (right @ right.t())) * left).sum(dim=1)  # ‖L R‖²_row
    norm_sq = (w0_sq + 2.0 * cross + delta_sq).clamp_min(0.0)
    count = min(refined_rows, norm_sq.shape[0])
    if count > 0:
        worst = torch.topk(norm_sq / w0_sq.clamp_min(torch.finfo(torch.float32).tiny), count, largest=False).indices
        rows = w0.index_select(0, worst).float() + left.index_select(0, worst) @ right
        norm_sq = norm_sq.index_copy(0, worst, rows.square().sum(dim=1))
    return norm_sq.sqrt()


class BaseRowNormCache:
    """‖W0‖²_row of a layer's base weight, recomputed only when the weight changes.

    The key is the weight's storage, in-place version counter, dtype and device, so that
    ``model.to(...)``, a reloaded or edited base weight, or a merge/unmerge in between never
    leave a stale value. It is not a buffer: it is derived from the base, so it has no place
    in a state dict or adapter file, and ``model.to(bfloat16)`` must not round it.
    """

    def __init__(self):
        self._key = None
        self._value: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """‖W0‖²_row [out] float32; ``weight`` is the stored parameter, ``w0`` its canonical view."""
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if key != self._key or self._value is None:
            self._value = base_row_norm_sq(w0)
            self._key = key
        return self._value
