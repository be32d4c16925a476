"""QuanTA (Chen et al., 2024): ``ΔW = T(θ) − T(θ0)``, a circuit of small tensors on a factorised dimension.

T(θ) is the operator of :mod:`modapt_quanta.circuit`: the input x [..., d_in] reshaped to
[..., a_1, …, a_N], one gate per pair of axes applied in sequence, reshaped to [..., d_out].
Its rank is not limited by the gates' size (a product of full-rank gates is full-rank), which
is the point of the method: high-rank updates at the parameter cost of small tensors.

Dropout, as in the official code, acts on the trainable circuit's input only:
``ΔW x = T(θ) drop(x) − T(θ0) x`` (the official code merges T(θ0) into W0, which sees x).

``θ0`` is a frozen copy of θ taken at initialisation, so ΔW = 0 and the adapted layer equals
W0 at the start while T itself is a generic (orthogonal) operator whose gradients are not
degenerate. The paper's own formulation is the same: W = W0 + T_θ − S with S = T_θ0 frozen.

Host keys: ``quanta_theta`` (parameter, [P]) and ``quanta_theta0`` (buffer, [P], saved with the
adapter through :meth:`Quanta.extra_state`, with ``quanta_format_version`` [1] int64): every
gate, flattened and concatenated in circuit order, P = Σ o_m·o_n·i_m·i_n.
"""

from __future__ import annotations

import math
import weakref

import modapt
import torch
from modapt import layers
from torch import nn

from .circuit import apply_circuit, circuit_matrix, init_gates, plan_circuit
from .difference import Schedule, circuit_difference
from .factorization import factorize
from .options import QuantaOptions

#: saved with every QuanTA layer as ``quanta_format_version``. 2: gates in the official order
#: (format 1, without the tensor, applied them in reverse order: the same θ is another matrix)
FORMAT_VERSION = 2
DEFAULT_NUM_AXES = 4  # N = 4 in the paper's settings (LoRaDA-LMAM Table 17, from QuanTA)


def layer_factors(out_f: int, in_f: int, options: QuantaOptions) -> tuple[list[int], list[int]]:
    """(input factors, output factors) of a layer [out_f, in_f] under ``options``.

    ``dims`` applies to every side whose size is its product; any other side is factored by
    :func:`modapt_quanta.factorization.factorize` into the same number of axes. ``ValueError``
    when ``dims`` fits neither side, or a side cannot be factored.
    """
    if options.dims is None:
        n = options.num_axes or DEFAULT_NUM_AXES
        sides = [factorize(in_f, n), factorize(out_f, n) if out_f != in_f else None]
        return sides[0], sides[1] or sides[0]
    dims = list(options.dims)
    hidden = math.prod(dims)
    if hidden not in (in_f, out_f):
        raise ValueError(f"dims {dims} multiply to {hidden}, but this layer maps {in_f} -> {out_f}; dims must "
                         "factor its input or its output size (the other side is factored automatically)")
    in_dims = dims if in_f == hidden else factorize(in_f, len(dims))
    out_dims = dims if out_f == hidden else factorize(out_f, len(dims))
    return in_dims, out_dims


_last_cast: tuple = (None, None, None, None)


def narrowed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the narrower compute ``dtype`` (autocast), the copy shared by consecutive calls on the same x.

    A frozen base layer saves no activation for backward (its weight needs no gradient), so
    what QuanTA saves is all it adds: the bf16 copy of x rather than the fp32 x. q, k and v (and
    gate, up) read one x; they share the one copy (the last cast is remembered weakly: x and the
    copy stay alive only through their other owners, the copy through the saved tensors).
    """
    global _last_cast
    source, version, key, cast = _last_cast
    if source is not None and source() is x and version == x._version and key == (dtype, torch.is_grad_enabled()):
        hit = cast()
        if hit is not None:
            return hit
    out = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, (dtype, torch.is_grad_enabled()), weakref.ref(out))
    return out


class Quanta(modapt.Update):
    """ΔW = T(θ) − T(θ0). ``forward`` applies both circuits to x (fused); ΔW is built only for merges."""

    def __init__(self, host: nn.Module, options: QuantaOptions):
        super().__init__(host, options)
        out_f, in_f = layers.dims_of(host.base_layer)
        in_dims, out_dims = layer_factors(out_f, in_f, options)
        self.circuit = plan_circuit(in_dims, out_dims)
        self.schedule = Schedule(self.circuit)
        self._frozen_key, self._frozen = None, None
        theta0 = init_gates(self.circuit, options.init)
        host.register_parameter("quanta_theta", nn.Parameter(theta0.clone()))
        host.register_buffer("quanta_theta0", theta0)
        host.register_buffer("quanta_format_version", torch.tensor([FORMAT_VERSION]))
        host.quanta_dropout = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()

    def forward(self, x, base_out, base_layer):
        """x [..., in] -> (T(θ) − T(θ0)) x [..., out], both circuits fused, only x saved for backward.

        The compute dtype is the autocast dtype under autocast, else θ's (a bf16 x is cast in
        each pass, never stored in float32). See :mod:`modapt_quanta.difference`.
        """
        theta = self.host.quanta_theta
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else theta.dtype
        drop = self.host.quanta_dropout
        if drop.training and isinstance(drop, nn.Dropout):
            dropped = drop(x)
            # T(θ) drop(x) − T(θ0) x = [T(θ) − T(θ0)] drop(x) + T(θ0) (drop(x) − x): the fused path
            # on drop(x), plus the frozen circuit on the difference (only while dropout acts)
            theta0 = self.host.quanta_theta0.to(dtype)
            correction = apply_circuit(self.circuit, theta0, (dropped - x).to(dtype))
            return circuit_difference(self.schedule, dropped, theta, self.frozen(dtype), dtype) + correction
        if x.element_size() > torch.empty((), dtype=dtype).element_size():
            x = narrowed(x, dtype)
        return circuit_difference(self.schedule, x, theta, self.frozen(dtype), dtype)

    def frozen(self, dtype: torch.dtype) -> torch.Tensor:
        """[θ0, −θ0] [2P] in ``dtype``, rebuilt only when θ0 moves, changes (load) or the dtype does."""
        theta0 = self.host.quanta_theta0
        key = (theta0.data_ptr(), theta0.device, theta0._version, dtype)
        if self._frozen_key != key:
            with torch.no_grad():
                self._frozen = torch.cat([theta0, -theta0]).to(dtype)
            self._frozen_key = key
        return self._frozen

    def delta_weight(self, w0):
        """ΔW [out, in] = T(θ) − T(θ0), each built once as a full matrix, in ``w0``'s dtype."""
        theta = self.host.quanta_theta.to(w0.dtype)
        theta0 = self.host.quanta_theta0.to(w0.dtype)
        return circuit_matrix(self.circuit, theta) - circuit_matrix(self.circuit, theta0)

    def extra_state(self):
        # the version travels with the tensors: a folder without it was saved in format 1
        # (reverse gate order) and is refused on load rather than read as another matrix
        return {"quanta_theta0": self.host.quanta_theta0, "quanta_format_version": self.host.quanta_format_version}
