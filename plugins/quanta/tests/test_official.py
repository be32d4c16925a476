"""modapt's QuanTA against the official construction (quanta-fine-tuning/quanta, quanta/tuners/quanta.py), written out.

The official layer keeps one gate per pair ``(dim1, dim2)`` of ``combinations(range(-1, -N-1, -1), 2)``
(negative axes, dim1 the later one), shaped ``[out[dim2], out[dim1], in[dim2], in[dim1]]``, and
contracts them in that order with x viewed as [batch, d_1, …, d_N]: each gate renames the two axes
it acts on. Here that contraction is spelled out with one einsum per gate, independently of
:mod:`modapt_quanta.circuit`; modapt's flat θ is read as the official gate list (same order, same
layout), so any departure in order, layout, reshape or the T(θ) − T(θ0) difference shows.
A rectangular layer (which the official code pads instead) follows the rule that an axis takes
its output size at the last gate touching it, the same einsum otherwise.
"""

import itertools
import math
import string

import modapt
import modapt_quanta.plugin
import pytest
import torch
from torch import nn


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt_quanta.plugin, name="quanta", distribution="modapt-quanta")
    return modapt_registry


def _official_gate_shapes(in_dims, out_dims):
    """[(dim1, dim2, shape)] in the official order; shape [o[dim2], o[dim1], i[dim2], i[dim1]] at the current sizes."""
    n = len(in_dims)
    pairs = list(itertools.combinations(range(-1, -n - 1, -1), 2))
    last = {ax: max(k for k, p in enumerate(pairs) if ax in p) for ax in range(-1, -n - 1, -1)}
    cur = {ax: in_dims[ax] for ax in range(-1, -n - 1, -1)}
    out = []
    for k, (d1, d2) in enumerate(pairs):
        o1 = out_dims[d1] if last[d1] == k else cur[d1]
        o2 = out_dims[d2] if last[d2] == k else cur[d2]
        out.append((d1, d2, (o2, o1, cur[d2], cur[d1])))
        cur[d1], cur[d2] = o1, o2
    return out


def _official_apply(gates, x, in_dims, out_dims):
    """x [..., d_in] -> [..., d_out] by the official contraction: one einsum per gate, in order."""
    n = len(in_dims)
    lead = x.shape[:-1]
    h = x.reshape(-1, *in_dims)
    letters = string.ascii_lowercase[:n]
    for (d1, d2, _), g in zip(_official_gate_shapes(in_dims, out_dims), gates):
        a1, a2 = letters[d1], letters[d2]
        out = letters.replace(a1, "Y").replace(a2, "Z")
        h = torch.einsum(f"Z Y {a2} {a1},z{letters}->z{out}".replace(" ", ""), g, h)
    return h.reshape(*lead, math.prod(out_dims))


def _official_gates(flat, in_dims, out_dims):
    shapes = [s for _, _, s in _official_gate_shapes(in_dims, out_dims)]
    return [t.view(s) for t, s in zip(torch.split(flat, [math.prod(s) for s in shapes]), shapes)]


@pytest.mark.parametrize("out_f,in_f,dims,out_dims", [(48, 48, [4, 3, 2, 2], [4, 3, 2, 2]),
                                                      (72, 48, [4, 3, 2, 2], [4, 3, 3, 2])])
def test_delta_output_and_gradients_equal_the_official_construction(registry, out_f, in_f, dims, out_dims):
    torch.manual_seed(0)
    model = modapt.apply(nn.Sequential(nn.Linear(in_f, out_f)),
                         {"adapter": [{"method": "quanta", "targets": ["0"], "dims": dims}]}, registry=registry)
    model = model.double()
    host = model[0]
    assert host.update.circuit.out_dims == tuple(out_dims)
    with torch.no_grad():
        host.quanta_theta.add_(0.3 * torch.randn_like(host.quanta_theta))
    theta, theta0 = host.quanta_theta, host.quanta_theta0

    def official_delta(th, x):
        return (_official_apply(_official_gates(th, dims, out_dims), x, dims, out_dims)
                - _official_apply(_official_gates(theta0, dims, out_dims), x, dims, out_dims))

    # ΔW: the official merge builds T on the identity; rows = outputs
    eye = torch.eye(in_f, dtype=torch.float64)
    with torch.no_grad():
        want_dw = official_delta(theta, eye).t()
        got_dw = host.update.delta_weight(host.base_layer.weight)
    assert want_dw.abs().max() > 0.1  # a non-trivial update
    torch.testing.assert_close(got_dw, want_dw, atol=1e-6, rtol=1e-6)

    # the layer's output and the gradients in x and θ (the fused training path)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, requires_grad=True)
    y = model(x)
    ref_theta = theta.detach().clone().requires_grad_(True)
    ref = host.base_layer(x) + official_delta(ref_theta, x)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, theta), g)
    want = torch.autograd.grad(ref, (x, ref_theta), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_the_reverse_order_is_another_matrix(registry):
    """The test above can fail: the former (ascending) order gives a different ΔW on the same θ."""
    dims = [4, 3, 2, 2]
    torch.manual_seed(0)
    model = modapt.apply(nn.Sequential(nn.Linear(48, 48)),
                         {"adapter": [{"method": "quanta", "targets": ["0"], "dims": dims}]}, registry=registry)
    host = model[0]
    gates = _official_gates(host.quanta_theta.detach(), dims, dims)
    eye = torch.eye(48)
    official = _official_apply(gates, eye, dims, dims)
    # ascending order: apply the same gates last-to-first (pairs (0,1) … (2,3))
    letters = string.ascii_lowercase[:4]
    h = eye.reshape(-1, *dims)
    for (d1, d2, _), g in reversed(list(zip(_official_gate_shapes(dims, dims), gates))):
        a1, a2 = letters[d1], letters[d2]
        out = letters.replace(a1, "Y").replace(a2, "Z")
        h = torch.einsum(f"ZY{a2}{a1},z{letters}->z{out}", g, h)
    reverse = h.reshape(48, 48)
    assert (official - reverse).norm() / official.norm() > 0.5


def test_a_folder_saved_before_the_official_order_is_refused(registry, tmp_path):
    """Format 1 (reverse gate order, no ``quanta_format_version``): refused with a message naming the change."""
    import hashlib
    import json

    from modapt.errors import AdapterLoadError
    from safetensors.torch import load_file, save

    model = modapt.apply(nn.Sequential(nn.Linear(48, 48)),
                         {"adapter": [{"method": "quanta", "targets": ["0"], "dims": [4, 3, 2, 2]}]}, registry=registry)
    modapt.save(model, tmp_path, registry=registry)
    fresh = nn.Sequential(nn.Linear(48, 48))
    fresh[0].load_state_dict(model[0].base_layer.state_dict())
    assert torch.equal(modapt.load(fresh, tmp_path, registry=registry)[0].quanta_format_version, torch.tensor([2]))
    # rewrite the folder as format 1 wrote it: the same tensors without the version, in the
    # format-1 file names (adapter_config.json + adapter_model.safetensors)
    tensors = {k: v for k, v in load_file(tmp_path / "modapt_adapter.safetensors").items()
               if not k.endswith("quanta_format_version")}
    blob = save(tensors, metadata={"format": "pt"})
    config = json.loads((tmp_path / "modapt_adapter.json").read_text())
    for name in ("modapt_adapter.safetensors", "modapt_adapter.json"):
        (tmp_path / name).unlink()
    (tmp_path / "adapter_model.safetensors").write_bytes(blob)
    config["format_version"] = 1
    config["weights"] = {"file": "adapter_model.safetensors", "sha256": hashlib.sha256(blob).hexdigest(),
                         "count": len(tensors)}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = nn.Sequential(nn.Linear(48, 48))
    base[0].load_state_dict(model[0].base_layer.state_dict())
    with pytest.raises(AdapterLoadError, match="quanta_format_version' is missing: .*older, incompatible format"):
        modapt.load(base, tmp_path, registry=registry)
    assert not hasattr(base[0], "quanta_theta")  # the model is left as it was
