"""The QuanTA circuit: small tensors ("gates") acting on pairs of axes of a reshaped vector.

A vector x of size d_in = a_1 ⋯ a_N is read as a tensor x[i_1, …, i_N] (row-major, as
``x.reshape(a_1, …, a_N)``). A gate on axes (m, n) is a tensor G[o_m, o_n, i_m, i_n] acting
as ``y[…, o_m, …, o_n, …] = Σ_{i_m, i_n} G[o_m, o_n, i_m, i_n] x[…, i_m, …, i_n, …]`` and as the
identity on every other axis. The circuit applies one gate per pair of axes in the order of the
official code (quanta-fine-tuning/quanta, ``itertools.combinations(range(-1, -N-1, -1), 2)``):
the two fastest-varying axes first, e.g. for N = 4 (2,3), (1,3), (0,3), (1,2), (0,2), (0,1).
The gates do not commute, so the order is part of the method, not a free choice (modapt-quanta
before format 2 applied the reverse order; see the README).

For a layer with d_out ≠ d_in, the output is factorised too, d_out = b_1 ⋯ b_N, and each axis
changes size at the *last* gate that touches it: that gate's output size on axis k is b_k,
every earlier gate keeps the axis' current size. For a square layer with equal input and
output factors every gate is square.
"""

from __future__ import annotations

import itertools
import math
import string
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Circuit:
    """The static plan of a circuit.

    in_dims, out_dims: the factors (a_1 … a_N), (b_1 … b_N).
    pairs: the axes (m, n) of each gate, in the order applied.
    shapes: each gate's shape (o_m, o_n, i_m, i_n).
    """

    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    shapes: tuple[tuple[int, int, int, int], ...]

    @property
    def sizes(self) -> list[int]:
        """Number of entries of each gate (the flat parameter is their concatenation)."""
        return [math.prod(s) for s in self.shapes]

    @property
    def num_parameters(self) -> int:
        return sum(self.sizes)


def plan_circuit(in_dims: list[int], out_dims: list[int]) -> Circuit:
    """The gates of a circuit mapping a tensor of shape ``in_dims`` to one of shape ``out_dims``."""
    if len(in_dims) != len(out_dims):
        raise ValueError(f"input axes {in_dims} and output axes {out_dims} differ in number")
    n = len(in_dims)
    # official order: negative axes (dim1, dim2), dim1 the later one; stored as (m, n), m < n
    pairs = [(n + d2, n + d1) for d1, d2 in itertools.combinations(range(-1, -n - 1, -1), 2)]
    last = {axis: max(k for k, p in enumerate(pairs) if axis in p) for axis in range(n)}
    current = list(in_dims)
    shapes = []
    for k, (a, b) in enumerate(pairs):
        o_a = out_dims[a] if last[a] == k else current[a]
        o_b = out_dims[b] if last[b] == k else current[b]
        shapes.append((o_a, o_b, current[a], current[b]))
        current[a], current[b] = o_a, o_b
    assert current == list(out_dims)
    return Circuit(tuple(in_dims), tuple(out_dims), tuple(pairs), tuple(shapes))


def split_gates(circuit: Circuit, flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of each gate [o_m, o_n, i_m, i_n] in the flat parameter vector [num_parameters]."""
    return [g.view(s) for g, s in zip(torch.split(flat, circuit.sizes), circuit.shapes)]


def _equation(n: int, a: int, b: int) -> str:
    # axes of x: batch 'z' and one letter per axis; the gate renames axes a and b
    letters = string.ascii_lowercase[:n]
    new_a, new_b = "Y", "X"
    out = list(letters)
    out[a], out[b] = new_a, new_b
    return f"{new_a}{new_b}{letters[a]}{letters[b]},z{letters}->z{''.join(out)}"


def apply_circuit(circuit: Circuit, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """T(θ) x: x [..., d_in] -> [..., d_out], with θ the flat parameter vector [num_parameters]."""
    lead = x.shape[:-1]
    h = x.reshape(-1, *circuit.in_dims)
    n = len(circuit.in_dims)
    for gate, (a, b) in zip(split_gates(circuit, flat), circuit.pairs):
        h = torch.einsum(_equation(n, a, b), gate, h)
    return h.reshape(*lead, math.prod(circuit.out_dims))


def circuit_matrix(circuit: Circuit, flat: torch.Tensor) -> torch.Tensor:
    """T(θ) as a matrix [d_out, d_in], built once by applying the circuit to the identity."""
    d_in = math.prod(circuit.in_dims)
    eye = torch.eye(d_in, dtype=flat.dtype, device=flat.device)
    return apply_circuit(circuit, flat, eye).t()


def init_gates(circuit: Circuit, init: str = "kaiming") -> torch.Tensor:
    """A flat θ0 [num_parameters], each gate initialised as a matrix [o_m·o_n, i_m·i_n].

    ``"kaiming"`` (the official code): Kaiming-uniform with the linear gain (the official
    a = √5 is ignored by that gain), i.e. U(−√(3/fan_in), √(3/fan_in)): unit variance per
    output, so T(θ0) keeps the input's norm in expectation. ``"orthogonal"``: (semi-)orthogonal gates, which make T(θ0)
    an isometry for square layers, so no axis pair starts amplified or silenced. Uses the
    global torch generator (seed it for reproducible adapters).
    """
    parts = []
    for o_a, o_b, i_a, i_b in circuit.shapes:
        m = torch.empty(o_a * o_b, i_a * i_b)
        if init == "orthogonal":
            torch.nn.init.orthogonal_(m)
        elif init == "kaiming":
            torch.nn.init.kaiming_uniform_(m, a=math.sqrt(5), nonlinearity="linear")
        else:
            raise ValueError(f"unknown init {init!r}; expected 'kaiming' or 'orthogonal'")
        parts.append(m.reshape(-1))
    return torch.cat(parts)
