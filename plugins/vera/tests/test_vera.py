"""VeRA against PEFT 0.21 on the same weights: shared matrices, forward, merge, files both ways."""

from __future__ import annotations

import pytest
import torch

import modapt
import modapt.lora
import modapt_vera.plugin
from modapt.testing import tiny_gpt2, tiny_inputs, tiny_llama
from modapt_vera.vera import VeraProjection

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # [64, 64], [32, 64], [64, 96]: in_max 96, out_max 64
KEY, R = 1234, 8


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    modapt_registry.register_plugin(modapt_vera.plugin, "vera", "modapt-vera")
    return modapt_registry


def _peft_vera(factory=tiny_llama, targets=TARGETS, **config):
    from peft import VeraConfig, get_peft_model

    cfg = VeraConfig(r=R, target_modules=targets, projection_prng_key=KEY, **{"save_projection": False, **config})
    return get_peft_model(factory(), cfg)


def _randomise(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from λ_b = 0, so the adapter matters
        for name, param in sorted(model.named_parameters()):
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=gen))


def _ours(factory=tiny_llama, targets=TARGETS, registry=None, **options):
    recipe = {"adapter": [{"method": "vera", "r": R, "projection_prng_key": KEY, "targets": targets, **options}]}
    return modapt.apply(factory(), recipe, registry=registry)


def _copy_lambdas(peft_model, ours):
    """PEFT's λ (``...<path>.vera_lambda_b.default``) onto modapt's (``<path>.vera_lambda_b``)."""
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if "vera_lambda" in n}
    mine = modapt.adapter_state_dict(ours)
    assert set(theirs) == set(mine)
    with torch.no_grad():
        for name, param in mine.items():
            param.copy_(theirs[name])


def _logits(model):
    with torch.no_grad():
        return model(**tiny_inputs()).logits


def test_same_key_gives_peft_shared_matrices_and_init(registry):
    peft_model = _peft_vera()
    ours = _ours(registry=registry)
    projection = ours.modapt_shared[f"vera_{KEY}_{R}"]
    assert isinstance(projection, VeraProjection)
    assert torch.equal(projection.vera_A, peft_model.base_model.vera_A["default"])   # [8, 96]
    assert torch.equal(projection.vera_B, peft_model.base_model.vera_B["default"])   # [64, 8]
    assert projection.vera_A.shape == (R, 96) and projection.vera_B.shape == (64, R)
    # one module for every layer, registered once: a single A in the model's buffers
    hosts = list(modapt.state_of(ours).layers.values())
    assert all(h.update.projection is projection for h in hosts)
    assert sum(1 for n, _ in ours.named_buffers() if n.endswith("vera_A")) == 1
    # PEFT's init: λ_b = 0, λ_d = d_initial; the adapted model is the base model
    layer = ours.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.vera_lambda_b, torch.zeros(64))
    assert torch.equal(layer.vera_lambda_d, torch.full((R,), 0.1))
    torch.testing.assert_close(_logits(ours), _logits(tiny_llama()), atol=0, rtol=0)


@pytest.mark.parametrize("factory,targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_forward_and_merged_weights_equal_peft(registry, factory, targets):
    peft_model = _peft_vera(factory, targets).eval()
    _randomise(peft_model)
    ours = _ours(factory, targets, registry=registry).eval()
    _copy_lambdas(peft_model, ours)
    reference = _logits(peft_model)
    assert not torch.allclose(reference, _logits(factory()), atol=1e-3)
    torch.testing.assert_close(_logits(ours), reference, atol=1e-6, rtol=0)
    # merged weights, layer by layer, equal PEFT's merge
    merged_peft = peft_model.merge_and_unload()
    modapt.merge(ours)
    theirs = dict(merged_peft.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, theirs[name], atol=1e-6, rtol=0)
    assert not hasattr(ours, "modapt_shared")  # unload takes the shared state off


def test_saved_adapter_regenerates_shared_matrices_on_a_fresh_base(registry, tmp_path):
    ours = _ours(registry=registry).eval()
    _randomise(ours)
    modapt.save(ours, tmp_path / "a")
    from safetensors.torch import load_file

    # modapt's own tensor file, and PEFT's beside it (a VeRA recipe has a PEFT format): the λ only
    keys = set(load_file(tmp_path / "a" / "modapt_adapter.safetensors"))
    assert keys == set(modapt.adapter_state_dict(ours))  # A and B are regenerated, not stored
    stored = [p for p in (tmp_path / "a").iterdir() if p.suffix == ".safetensors"]
    assert all(k.endswith(("vera_lambda_b", "vera_lambda_d")) for p in stored for k in load_file(p))
    again = modapt.load(tiny_llama(), tmp_path / "a", registry=registry).eval()
    torch.testing.assert_close(_logits(again), _logits(ours), atol=0, rtol=0)
    # and after .to(): the shared module moves once, every layer sees it
    again.to(torch.float64)
    assert all(h.update.projection.vera_A.dtype == torch.float64 for h in modapt.state_of(again).layers.values())


def test_peft_folder_converts_both_ways(registry, tmp_path):
    from modapt_export.peft_format import load_peft, save_peft
    from peft import PeftModel

    peft_model = _peft_vera().eval()
    _randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    reference = _logits(peft_model)
    ours = load_peft(tiny_llama(), tmp_path / "peft", registry=registry).eval()
    torch.testing.assert_close(_logits(ours), reference, atol=1e-6, rtol=0)
    save_peft(ours, tmp_path / "back", registry=registry)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "back").eval()
    torch.testing.assert_close(_logits(again), reference, atol=1e-6, rtol=0)


def test_map_over_vera_takes_the_one_node_path(registry):
    import modapt_map.plugin

    registry.register_plugin(modapt_map.plugin, "map", "modapt-map")
    recipe = {"adapter": [{"method": "map", "targets": ["q_proj"],
                           "update": {"method": "vera", "r": R, "projection_prng_key": KEY}}]}
    model = modapt.apply(tiny_llama(), recipe, registry=registry)
    _randomise(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "MapFactoredBackward"
    # the formula written out: α W0/‖W0‖ x + β ΔW/‖ΔW‖ x with ΔW = Λ_b B_s Λ_d A_s
    w0 = layer.base_layer.weight
    p = layer.update.projection
    delta = (layer.vera_lambda_b[:, None] * p.vera_B[:64]) @ (layer.vera_lambda_d[:, None] * p.vera_A[:, :64])
    w = layer.map_alpha * w0 / w0.norm() + layer.map_beta * delta / delta.norm()
    torch.testing.assert_close(y, x @ w.t(), atol=1e-5, rtol=1e-5)


def test_peft_folder_with_stored_projections_converts_both_ways(registry, tmp_path):
    """PEFT's default save_projection=True: vera_A/vera_B stored once at model level, checked, kept."""
    from modapt_export import merge_checkpoint
    from modapt_export.peft_format import PeftFormatError, load_peft, save_peft
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    peft_model = _peft_vera(save_projection=True).eval()
    _randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    stored = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(stored)
    reference = _logits(peft_model)
    ours = load_peft(tiny_llama(), tmp_path / "peft", registry=registry).eval()
    torch.testing.assert_close(_logits(ours), reference, atol=1e-6, rtol=0)
    assert modapt.state_of(ours).layers["model.layers.0.self_attn.q_proj"].update.options.save_projection
    # modapt -> PEFT keeps PEFT's layout: each projection once, at model level; PEFT loads it
    save_peft(ours, tmp_path / "back", registry=registry)
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(k for k in back if "vera_A" in k or "vera_B" in k) == ["base_model.vera_A", "base_model.vera_B"]
    assert torch.equal(back["base_model.vera_A"], stored["base_model.vera_A"])
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "back").eval()
    torch.testing.assert_close(_logits(again), reference, atol=1e-6, rtol=0)
    # the streaming merge reads it too (shared state built on the skeleton first): PEFT's merge, 1e-6
    tiny_llama().save_pretrained(tmp_path / "base")
    merge_checkpoint(tmp_path / "base", tmp_path / "peft", tmp_path / "merged", registry=registry)
    merged = type(tiny_llama()).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), reference, atol=1e-5, rtol=0)
    # a stored projection that is not the key's draw is refused in one line, the model left unadapted
    stored["base_model.vera_A"][0, 0] += 0.5
    save_file(stored, tmp_path / "peft" / "adapter_model.safetensors", metadata={"format": "pt"})
    base = tiny_llama()
    with pytest.raises(PeftFormatError, match=r"'base_model.vera_A' differs from the one regenerated .* 0.5") as info:
        load_peft(base, tmp_path / "peft", registry=registry)
    assert "\n" not in str(info.value) and not hasattr(base, "modapt_shared")
