"""The π rank inflation and the two ways of applying it.

``Iπ`` rotates row i of a d×d matrix cyclically by i to the right::

    Iπ(M)[i, j] = M[i, (j − i) mod d]

so that ``Iπ(BA)`` has (almost) full rank although BA has rank ≤ r (paper §3.2.1, eq. 7).
Applying ``T = s · Iπ(BA)`` to vectors y [..., d]:

- **direct**: build Iπ(BA) (d×d, O(d²r)) once per call, then one GEMM (O(N d²) for N vectors);
- **fft**: ``(Iπ(BA) y)_i = Σ_k B[i, k] · c_k(i)`` with ``c_k(i) = Σ_m A[k, m] · y[(m + i) mod d]``,
  the circular cross-correlation of row A_k with y, computed as
  ``irfft(conj(rfft(A_k)) · rfft(y))``: O(r · d log d) per vector, and no d×d matrix.

``torch.fft`` has no bfloat16 kernels (and float16 only for powers of two on CUDA), so the
fft path computes in float32 whatever the input dtype and returns float32.
"""

from __future__ import annotations

import torch


def rotate_rows(m: torch.Tensor) -> torch.Tensor:
    """``Iπ(m)`` for a square ``m`` [d, d]: row i rotated right by i. Differentiable, no index tensor.

    With ``C = [m, m]`` ([d, 2d], contiguous), ``Iπ(m)[i, j] = C[i, d − i + j]``, which is
    element ``d + i·(2d − 1) + j`` of C flattened: a strided view of C. The backward is the
    inverse rotation (row i left by i), ``[g, g]`` read with row stride 2d + 1: one d×d copy,
    where autograd's own backward of the view would zero-fill and copy [d, 2d] twice.
    """
    d = m.shape[-1]
    if m.shape != (d, d):
        raise ValueError(f"Iπ needs a square matrix, got {tuple(m.shape)}")
    return _RotateRows.apply(m)


def _rotate(m: torch.Tensor, sign: int) -> torch.Tensor:
    """Row i rotated by i, right (sign = +1, Iπ) or left (sign = −1, its inverse): a strided view."""
    d = m.shape[-1]
    doubled = torch.cat([m, m], dim=1)
    if sign > 0:
        return doubled.as_strided((d, d), (2 * d - 1, 1), doubled.storage_offset() + d)
    return doubled.as_strided((d, d), (2 * d + 1, 1), doubled.storage_offset())


class _RotateRows(torch.autograd.Function):
    @staticmethod
    def forward(m):
        return _rotate(m, +1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return _rotate(grad, -1)


def pi_matrix(lorma_a: torch.Tensor, lorma_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``T = s · Iπ(B A)`` [d, d] from A [r, d] and B [d, r]."""
    return rotate_rows(lorma_b @ lorma_a) * scaling


def pi_apply_direct(lorma_a: torch.Tensor, lorma_b: torch.Tensor, scaling: float, y: torch.Tensor) -> torch.Tensor:
    """``T y`` for y [..., d] with ``T = s · Iπ(BA)`` built once: [..., d], in the parameters' dtype."""
    t = pi_matrix(lorma_a, lorma_b, scaling)
    return y.to(t.dtype) @ t.t() if not torch.is_autocast_enabled(y.device.type) else y @ t.t()


def pi_apply_fft(lorma_a: torch.Tensor, lorma_b: torch.Tensor, scaling: float, y: torch.Tensor) -> torch.Tensor:
    """``T y`` for y [..., d] with ``T = s · Iπ(BA)``, by circular cross-correlation: [..., d] float32.

    Memory: the correlations c [N, r, d] of N = y[..., 0].numel() vectors (kept for backward),
    instead of the d×d matrix of the direct path.
    """
    d = y.shape[-1]
    with torch.autocast(y.device.type, enabled=False):
        a = lorma_a.float()
        b = lorma_b.float()
        flat = y.reshape(-1, d).float()
        spectrum_y = torch.fft.rfft(flat, dim=-1)                      # [N, d//2 + 1]
        spectrum_a = torch.fft.rfft(a, dim=-1).conj()                  # [r, d//2 + 1]
        corr = torch.fft.irfft(spectrum_y[:, None, :] * spectrum_a[None], n=d, dim=-1)  # [N, r, d]
        # Σ_k B[i, k] c_k(i); a broadcast product and a sum: einsum picked a path ~6× slower on CPU
        out = (corr * b.t()).sum(dim=1) * scaling
    return out.reshape(y.shape)
