"""Safe merge and numerical edge cases, with the documented behaviour (docs/reliability.md).

- ``modapt.merge`` refuses NaN/Inf in any merged weight (StateError) before changing a layer,
  with unload=True and unload=False; an fp16 base whose merged weight overflows fp16 is
  refused with a message saying so; ``modapt merge`` (the CLI) checks by default.
- MAP with ΔW = 0 (both inits): output = base output, every gradient finite, merge = W0.
- LoRMA with Iπ in bf16 at d = 4096 (FFT path, computed in fp32): finite and close to fp32.
- LMAM with a map longer than the sequence (n > N) and a one-token sequence (N = 1): finite,
  and with align = "head" the first tokens do not depend on the tokens after them.
"""

from __future__ import annotations

import copy

import modapt
import modapt.cli
import modapt.lora
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama
from torch import nn

RECIPE = {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}]}
B = "model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    return modapt_registry


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(before, model):
    """Bit-equal state, NaN equal to NaN (the poisoned adapter tensor is part of the state)."""
    after = model.state_dict()
    return before.keys() == after.keys() and all(
        torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)


# ---------------------------------------------------------------------------- safe merge
@pytest.mark.parametrize("unload", [True, False])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_merge_refuses_nan_inf_before_changing_anything(registry, unload, value):
    model = modapt.apply(tiny_llama(), RECIPE)
    with torch.no_grad():
        modapt.trainable_parameters(model)["model.layers.0.self_attn.q_proj.lora_A.weight"].normal_()
        modapt.trainable_parameters(model)[B][3, 1] = value
    before = snapshot(model)
    with pytest.raises(modapt.StateError, match=r"merging 'model.layers.1.self_attn.v_proj' gives NaN or Inf"):
        modapt.merge(model, unload=unload)
    assert same(before, model) and modapt.is_adapted(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    modapt.remove(model)  # still usable: the adapter comes off cleanly


def test_fp16_overflow_in_a_merge_is_refused(registry):
    """ΔW is computed in fp32 (the adapter's dtype) but W* is stored in fp16: 7e4 > 65504 → Inf → refused."""
    model = modapt.apply(tiny_llama().half(), RECIPE)
    params = modapt.trainable_parameters(model)
    assert params[B].dtype == torch.float32  # the adapter stays fp32 over an fp16 base
    with torch.no_grad():
        params["model.layers.1.self_attn.v_proj.lora_A.weight"].fill_(0)
        params["model.layers.1.self_attn.v_proj.lora_A.weight"][0, 0] = 1.0
        params[B].fill_(0)
        params[B][0, 0] = 7e4  # ΔW[0, 0] = (lora_alpha / r) · 7e4 ≥ 7e4
    before = snapshot(model)
    with pytest.raises(modapt.StateError, match="NaN or Inf .*fp16 overflow"):
        modapt.merge(model)
    assert same(before, model)
    # just below the fp16 range the same merge goes through, and equals W0 + ΔW rounded to fp16
    with torch.no_grad():
        params[B][0, 0] = 1e3
    w0 = model.model.layers[1].self_attn.v_proj.base_layer.weight.detach().float().clone()
    modapt.merge(model)
    merged = model.model.layers[1].self_attn.v_proj.weight
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all()
    delta = merged.float() - w0
    assert delta[0, 0] > 100 and torch.count_nonzero(delta.abs() > 1e-2) == 1


def test_cli_merge_checks_for_nan_by_default(registry, tmp_path, capsys):
    export = pytest.importorskip("modapt_export")
    import modapt_export.plugin

    registry.register_plugin(modapt_export.plugin, name="export", distribution="modapt-export")
    tiny_llama().save_pretrained(tmp_path / "base")
    model = modapt.apply(tiny_llama(), RECIPE)
    with torch.no_grad():
        modapt.trainable_parameters(model)[B][0, 0] = float("nan")
    modapt.save(model, tmp_path / "bad")
    args = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "bad"), "--out"]
    code = modapt.cli.main(args + [str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 1 and "NaN or Inf" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert modapt.cli.main(args + [str(tmp_path / "forced"), "--unsafe"]) == 0  # the user's explicit choice
    assert export.__name__ == "modapt_export"


# ---------------------------------------------------------------------------- MAP with ΔW = 0
@pytest.mark.parametrize("init", ["paper", "identity"])
def test_map_with_zero_update_is_the_base_with_finite_gradients(registry, init):
    map_plugin = pytest.importorskip("modapt_map.plugin")
    registry.register_plugin(map_plugin, name="map", distribution="modapt-map")
    base = tiny_llama()
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = base(**inputs).logits
    model = modapt.apply(copy.deepcopy(base), {"adapter": [
        {"method": "map", "init": init, "targets": ["q_proj", "v_proj"], "update": {"method": "lora", "r": 4}}]})
    with torch.no_grad():  # ΔW = 0 exactly, whatever the init re-initialised: B = 0
        for name, p in modapt.trainable_parameters(model).items():
            if name.endswith("lora_B.weight"):
                p.zero_()
    out = model(**inputs).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in modapt.trainable_parameters(model).items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    # some gradient is non-zero, so training can leave W0 (B under "paper"; β under "identity",
    # where β = 0 keeps B's gradient at zero until β moves)
    assert any(g.abs().sum() > 0 for g in grads.values())
    modapt.merge(model)
    for i in range(2):
        torch.testing.assert_close(model.model.layers[i].self_attn.q_proj.weight,
                                   base.model.layers[i].self_attn.q_proj.weight, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- LoRMA π in bf16 at d = 4096
class OneLayer(nn.Module):
    def __init__(self, d, dtype):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_lorma_pi_in_bf16_at_4096_is_finite_and_close_to_fp32(registry, side):
    lorma_plugin = pytest.importorskip("modapt_lorma.plugin")
    registry.register_plugin(lorma_plugin, name="lorma", distribution="modapt-lorma")
    d = 4096
    torch.manual_seed(0)
    ref = OneLayer(d, torch.float32)
    nn.init.normal_(ref.proj.weight, std=d ** -0.5)
    low = OneLayer(d, torch.bfloat16)
    low.proj.weight.data.copy_(ref.proj.weight.data.to(torch.bfloat16))
    ref.proj.weight.data.copy_(low.proj.weight.data.float())  # the same W0 in both
    recipe = {"adapter": [{"method": "lorma", "r": 8, "inflation": "pi", "pi_path": "fft", "side": side,
                           "targets": ["proj"]}]}
    modapt.apply(ref, recipe)
    modapt.apply(low, recipe)
    with torch.no_grad():
        for p in modapt.trainable_parameters(ref).values():
            p.add_(torch.randn_like(p), alpha=0.02)  # the π init (T = I) moved as training would
        low.load_state_dict({k: v.to(dict(low.named_parameters())[k].dtype)
                             for k, v in modapt.adapter_state_dict(ref).items()}, strict=False)
    x = torch.randn(2, 3, d)
    with torch.no_grad():
        want = ref(x)
        got = low(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    rel = ((got.float() - want).norm() / want.norm()).item()
    # the bf16 base alone is ~2.3e-3 off fp32 here; the adapter adds a few roundings. (Far from
    # T = I the pre side loses more: W0x + (T − I)W0x cancels in the base dtype; see reliability.md.)
    assert rel < 1e-2, rel
    # the same numbers through the explicit Iπ matrix (fp32): the FFT path is the same map
    direct = copy.deepcopy(ref)
    modapt.remove(direct)
    modapt.apply(direct, {"adapter": [dict(recipe["adapter"][0], pi_path="direct")]})
    direct.load_state_dict(modapt.adapter_state_dict(ref), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- LMAM n > N, N = 1
@pytest.mark.parametrize("n", [1, 4, 64])
def test_lmam_with_map_longer_than_the_sequence(registry, n):
    lmam_plugin = pytest.importorskip("modapt_lmam.plugin")
    registry.register_plugin(lmam_plugin, name="lmam", distribution="modapt-lmam")
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "lmam", "n": n, "r": 1, "init": "random"}]})
    ids = tiny_inputs()["input_ids"][:1]
    seq = ids.shape[1]
    assert n == 1 or n > 1 and seq >= 2
    outs = {}
    for length in (1, min(seq, 5)):
        out = model(input_ids=ids[:, :length]).logits
        assert out.shape[1] == length and torch.isfinite(out).all()
        outs[length] = out
        out.square().mean().backward()
        for name, p in modapt.trainable_parameters(model).items():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        model.zero_grad()
    # causal + head-aligned map: the first token sees the same map entry whatever follows it
    torch.testing.assert_close(outs[1][:, 0], outs[min(seq, 5)][:, 0], rtol=1e-4, atol=1e-4)
