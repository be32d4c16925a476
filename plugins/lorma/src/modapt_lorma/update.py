"""The LoRMA update: ΔW = (T − I)·W0 (side "pre") or W0·(T − I) (side "post").

Shapes (W0 canonical [out, in], see :mod:`modapt.layers`): d = out for "pre", d = in for
"post"; parameters on the host ``lorma_A`` [r, d] and ``lorma_B`` [d, r]; s = lora_alpha / r.

===========  ==================  ==========================================
inflation    T                   T − I, the part this update contributes
===========  ==================  ==========================================
``plus``     I + s·BA            s·BA                (rank ≤ r)
``pi``       s·Iπ(BA)            s·Iπ(BA) − I        (almost full rank)
``none``     s·BA                s·BA − I            (T has rank ≤ r)
===========  ==================  ==========================================

Training never builds ΔW: "pre" applies T − I to the base output without its bias
(ΔW x = (T − I)(W0 x)), "post" applies W0 to (T − I) x. Only ``pi`` with the direct path
builds a d×d matrix (Iπ(BA)), once per forward; ``pi`` with the weight path builds
W* = T·W0 (or W0·T) and returns the whole layer output from :meth:`Lorma.layer_output`
(one GEMM instead of the base's), which the additive reparam uses in place of W0 x + ΔW x.
"""

from __future__ import annotations

import math
import warnings

import torch
from modapt import Update, fast_path_switches, layers
from torch import nn

from . import pi_path
from .inflation import pi_apply_direct, pi_apply_fft, pi_matrix
from .options import LormaOptions
from .weight_path import pi_weight_linear

_warned_fft_upcast = False


class Lorma(Update):
    """LoRMA on one layer. ``self.d`` is the size of T; ``self.scaling`` is s = lora_alpha / r."""

    # W* = T·W0 (or W0·T) for every inflation: the update rescales the whole weight, so on a
    # layer it must be the only active named adapter (modapt.named refuses a sum with another;
    # the ``pi`` weight path even returns the whole layer output)
    rescales_weight = True

    def __init__(self, host: nn.Module, options: LormaOptions):
        super().__init__(host, options)
        base = host.base_layer
        self.kind = layers.layer_kind(base)
        out_f, in_f = layers.dims_of(base)
        if self.kind == "embedding" and options.side == "post":
            raise ValueError(
                "side = 'post' on an embedding would make T num_embeddings × num_embeddings "
                f"({in_f}×{in_f}) and cost a dense pass over the table per token; "
                f"use side = 'pre' (T is {out_f}×{out_f})")
        self.d = out_f if options.side == "pre" else in_f
        r = options.r
        if r > self.d:
            raise ValueError(f"r = {r} exceeds d = {self.d} (the size of T for side = '{options.side}')")
        if options.pi_path == "weight" and options.dropout > 0:
            raise ValueError(
                f"pi_path = 'weight' cannot apply dropout = {options.dropout}: it replaces W0 x and T(W0 x) by "
                "one GEMM with T·W0, so there is no input of T to drop; use dropout = 0, or pi_path = 'auto' "
                "(picks direct or fft while dropout is active) or 'direct'")
        self.scaling = options.lora_alpha / r
        self.rank_history: list[tuple[int, dict]] = []  # filled by the rank monitor hook
        host.register_parameter("lorma_A", nn.Parameter(torch.empty(r, self.d)))
        host.register_parameter("lorma_B", nn.Parameter(torch.empty(self.d, r)))
        with torch.no_grad():
            init(host.lorma_A, host.lorma_B, options.inflation, self.scaling)
        host.lorma_dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()

    # ------------------------------------------------------------------ training
    def layer_output(self, x, base_layer, *args, **kwargs):
        """The whole layer output ``x W*ᵀ + b`` [..., out] for ``pi`` on the weight path, else ``None``.

        W* = T·W0 (pre) or W0·T (post) is built once per call (out·in·d) and replaces the
        base GEMM; see :mod:`modapt_lorma.weight_path`. ``None`` (so the additive reparam
        calls the base layer and :meth:`forward`) for ``plus``/``none``, embeddings, active
        dropout (the weight path has no input of T to drop), and where ``auto`` prices
        direct or fft lower (:func:`modapt_lorma.pi_path.choose`).
        """
        if self.options.inflation != "pi" or self.kind == "embedding" or args or kwargs:
            return None
        if not layers.has_plain_weight(base_layer):  # quantized: T·W0 would dequantize W0 every step
            return None
        if self._dropout_active():
            return None
        a, b = self.host.lorma_A, self.host.lorma_B
        out_f, in_f = layers.dims_of(base_layer)
        # modapt.fast_paths(lorma_recompute_weight=True): rebuild W* in backward instead of keeping it
        recompute = fast_path_switches.current.lorma_recompute_weight
        if self.options.pi_path == "auto":
            tokens = x.numel() // max(in_f, 1)
            training = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad)
            if pi_path.choose(out_f, in_f, self.options.side, self.options.r, tokens, training=training,
                              recompute=recompute) != "weight":
                return None
        elif self.options.pi_path != "weight":
            return None
        bias = getattr(base_layer, "bias", None)
        return pi_weight_linear(x, a, b, self.scaling, layers.weight_of(base_layer), bias, self.options.side,
                                recompute=recompute)

    def _dropout_active(self) -> bool:
        dropout = self.host.lorma_dropout
        return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0

    def forward(self, x, base_out, base_layer):
        """ΔW x, shape of ``base_out`` [..., out], never building ΔW.

        pre: ``(T − I)(base_out − bias)``; ΔW acts on W0 x, and ``base_out`` is W0 x + b.
        post: ``W0 ((T − I) x)`` through :func:`modapt.layers.linear_apply` (Conv1D's
        transposed storage included).
        """
        dropout = self.host.lorma_dropout
        if self.options.side == "pre":
            y = base_out
            bias = getattr(base_layer, "bias", None) if self.kind != "embedding" else None
            if bias is not None:
                y = y - bias
            return self.t_minus_i(dropout(y))
        u = self.t_minus_i(dropout(x))
        if layers.is_quantized(base_layer):  # W0 u by the quantized layer's own call
            return layers.w0_apply(base_layer, u)
        w0 = layers.weight_of(base_layer)
        if u.dtype != w0.dtype and not torch.is_autocast_enabled(u.device.type):
            u = u.to(w0.dtype)  # the base weight's precision, as the base layer computes
        return layers.linear_apply(base_layer, u, w0)

    def t_minus_i(self, y: torch.Tensor) -> torch.Tensor:
        """``(T − I) y`` for y [..., d]: [..., d] in the parameters' dtype (float32 from the fft path)."""
        a, b = self.host.lorma_A, self.host.lorma_B
        if y.dtype != a.dtype and not torch.is_autocast_enabled(y.device.type):
            y = y.to(a.dtype)
        inflation = self.options.inflation
        if inflation == "plus":
            return ((y @ a.t()) * self.scaling) @ b.t()  # scale the [N, r] side, not [N, d]
        if inflation == "none":
            return ((y @ a.t()) * self.scaling) @ b.t() - y
        if self.path_for(y) == "fft":
            _warn_upcast(y.dtype)
            return pi_apply_fft(a, b, self.scaling, y) - y.float()
        return pi_apply_direct(a, b, self.scaling, y) - y

    def path_for(self, y: torch.Tensor) -> str:
        """``"direct"`` or ``"fft"``: how :meth:`t_minus_i` applies T to ``y`` [..., d] (``pi`` only).

        This is the ΔW x contract (:meth:`forward`), used when the weight path does not apply
        (a reparam such as MAP that needs ΔW x apart, embeddings, active dropout, or ``auto``
        pricing it higher): explicit ``"weight"`` falls back to ``"direct"`` there, and ``auto``
        prices direct against fft with the same model.
        """
        path = self.options.pi_path
        if path in ("direct", "fft"):
            return path
        if path == "weight":
            return "direct"
        out_f, in_f = layers.dims_of(self.host.base_layer)
        tokens = y.numel() // max(self.d, 1)
        a = self.host.lorma_A
        training = torch.is_grad_enabled() and (y.requires_grad or a.requires_grad)
        return pi_path.choose(out_f, in_f, self.options.side, self.options.r, tokens, training=training,
                              allowed=("direct", "fft"))

    # ------------------------------------------------------------------ merging and norms
    def transform(self) -> torch.Tensor:
        """T [d, d], explicitly (for tests and the rank monitor): I + s·BA, s·Iπ(BA) or s·BA."""
        a, b = self.host.lorma_A, self.host.lorma_B
        inflation = self.options.inflation
        if inflation == "pi":
            return pi_matrix(a, b, self.scaling)
        m = (b @ a) * self.scaling
        return m + torch.eye(self.d, dtype=a.dtype, device=a.device) if inflation == "plus" else m

    def t_minus_i_matrix(self) -> torch.Tensor:
        """T − I [d, d], explicitly (s·BA for plus, without adding and removing I)."""
        a, b = self.host.lorma_A, self.host.lorma_B
        if self.options.inflation == "plus":
            return (b @ a) * self.scaling
        return self.transform() - torch.eye(self.d, dtype=a.dtype, device=a.device)

    def delta_weight(self, w0):
        """ΔW [out, in] in ``w0``'s dtype: (T − I)·W0 (pre) or W0·(T − I) (post)."""
        a, b = self.host.lorma_A.to(w0.dtype), self.host.lorma_B.to(w0.dtype)
        pre = self.options.side == "pre"
        if self.options.inflation == "plus":  # r·out·in work, no d×d matrix
            return (b * self.scaling) @ (a @ w0) if pre else ((w0 @ b) * self.scaling) @ a
        m = self.t_minus_i_matrix().to(w0.dtype)
        return m @ w0 if pre else w0 @ m

    def factors(self):
        """(L, R) with ΔW = L @ R for ``plus`` (pre: L = s·B [out, r], R = A·W0 [r, in];
        post: L = s·W0·B [out, r], R = A [r, in]); ``None`` for ``pi`` and ``none`` (not low rank).

        Building the W0 side costs r·out·in, as much as r tokens of a forward pass.
        """
        if self.options.inflation != "plus":
            return None
        return self._plus_factors(self._w0())

    def _plus_factors(self, w0):
        a, b = self.host.lorma_A, self.host.lorma_B
        w0 = w0.to(a.dtype)
        if self.options.side == "pre":
            return b * self.scaling, a @ w0
        return (w0 @ b) * self.scaling, a

    def frobenius_sq(self, w0):
        """‖ΔW‖_F² without building ΔW for ``plus`` and ``none`` (r·out·in work); ``None`` for ``pi``.

        plus: trace((LᵀL)(RRᵀ)) with the factors above. none, pre: ΔW = s·B(A W0) − W0, so
        ‖ΔW‖² = ‖s·B R‖² − 2s·⟨BᵀW0, R⟩ + ‖W0‖² with R = A W0 [r, in]; post likewise with
        W0·B and W0·Aᵀ [out, r]. pi has no form cheaper than building (T − I)·W0.
        """
        inflation = self.options.inflation
        if inflation == "pi":
            return None
        a, b = self.host.lorma_A, self.host.lorma_B
        w0 = w0.to(a.dtype)
        if inflation == "plus":
            left, right = self._plus_factors(w0)
            return ((left.t() @ left) * (right @ right.t())).sum()
        s = self.scaling
        if self.options.side == "pre":
            r_ = a @ w0                        # [r, in]
            low = s * s * ((b.t() @ b) * (r_ @ r_.t())).sum()
            cross = (r_ * (b.t() @ w0)).sum()
        else:
            w0b = w0 @ b                       # [out, r]
            low = s * s * ((w0b.t() @ w0b) * (a @ a.t())).sum()
            cross = (w0b * (w0 @ a.t())).sum()
        return low - 2 * s * cross + w0.pow(2).sum()

    def _w0(self) -> torch.Tensor:
        """The original W0 [out, in], also while the host is merged (then W* is in the base layer)."""
        if getattr(self.host, "merged", False):
            return self.host._canonical_backup()
        return layers.weight_of(self.host.base_layer)


def init(lorma_a: torch.Tensor, lorma_b: torch.Tensor, inflation: str, scaling: float) -> None:
    """Initialise A [r, d] and B [d, r] in place (issue 16, paper §3.2).

    plus: B = 0, A Kaiming-uniform (a = √5, as LoRA's A), so T = I.
    pi: B[:, 0] = 1 and the rest of B Kaiming-uniform; A[0, 0] = 1 and the rest 0; both
        divided by √s, so BA = e·e₀ᵀ/s (column 0 all ones) and s·Iπ(BA) = I.
    none: T = s·BA has rank ≤ r, so it cannot be I. A has r random orthonormal rows, B = Aᵀ,
        both divided by √s: T = AᵀA is the orthogonal projection onto a random r-dimensional
        subspace, the closest a rank-r T gets to I (‖T − I‖_F² = d − r). The paper gives no
        init for this ablation; this one is our choice.
    """
    r, d = lorma_a.shape
    root = math.sqrt(scaling)
    if inflation == "plus":
        nn.init.kaiming_uniform_(lorma_a, a=math.sqrt(5))
        nn.init.zeros_(lorma_b)
    elif inflation == "pi":
        nn.init.kaiming_uniform_(lorma_b, a=math.sqrt(5))
        lorma_b[:, 0] = 1.0
        lorma_a.zero_()
        lorma_a[0, 0] = 1.0
        lorma_a.div_(root)
        lorma_b.div_(root)
    elif inflation == "none":
        q, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))
        lorma_a.copy_(q.t() / root)
        lorma_b.copy_(q / root)
    else:  # pragma: no cover - the options schema refuses it first
        raise ValueError(f"unknown inflation {inflation!r}; accepted: 'plus', 'pi', 'none'")


def _warn_upcast(dtype: torch.dtype) -> None:
    global _warned_fft_upcast
    if dtype != torch.float32 and not _warned_fft_upcast:
        _warned_fft_upcast = True
        warnings.warn(f"LoRMA pi_path='fft' computes in float32 (torch.fft has no {dtype} kernels); "
                      "the result is cast back to the base output's dtype", stacklevel=3)
