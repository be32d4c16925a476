"""LoRMAπ's weight path (one GEMM with W* = T·W0) against the explicit formula and the direct path."""

import modapt
import modapt.lora
import pytest
import torch
from modapt.testing import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from modapt_lorma import pi_path
from modapt_lorma.weight_path import pi_weight_linear
from torch import nn
from transformers.pytorch_utils import Conv1D


def rotation_index(d):
    """idx[i, j] = (j − i) mod d, written out with loops: Iπ(M) = M.gather(1, idx)."""
    idx = torch.empty(d, d, dtype=torch.long)
    for i in range(d):
        for j in range(d):
            idx[i, j] = (j - i) % d
    return idx


def explicit_output(x, a, b, scaling, w0, bias, side):
    """x (s·Iπ(BA)·W0)ᵀ + b, or with W0·T for post: differentiable in x, a, b, with explicit matrices."""
    t = scaling * (b @ a).gather(1, rotation_index(a.shape[1]))
    w_star = t @ w0 if side == "pre" else w0 @ t
    out = x @ w_star.t()
    return out if bias is None else out + bias


def canonical(layer):
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()


@torch.no_grad()
def randomise(host, seed=1):
    gen = torch.Generator().manual_seed(seed)
    host.lorma_A.copy_(torch.randn(host.lorma_A.shape, generator=gen, dtype=host.lorma_A.dtype) * 0.3)
    host.lorma_B.copy_(torch.randn(host.lorma_B.shape, generator=gen, dtype=host.lorma_B.dtype) * 0.3)


def run_layer(registry, layer, path, side, x, recompute=False):
    """(output, ∂x, ∂A, ∂B) of ``layer`` adapted with LoRMAπ on ``path``, float64 throughout."""
    net = nn.Sequential(layer).double()
    modapt.apply(net, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 4, "lora_alpha": 6.0,
                                    "inflation": "pi", "side": side, "pi_path": path}]}, registry=registry)
    net.double()
    host = net[0]
    randomise(host)
    x = x.detach().clone().double().requires_grad_()
    with modapt.fast_paths(lorma_recompute_weight=recompute):
        out = net(x)
        out.pow(2).sum().backward()
    return out, x.grad, host.lorma_A.grad, host.lorma_B.grad, host


LAYERS = {
    # (factory, module path, input features): the real layers of the tiny models
    "llama-up": (tiny_llama, "model.layers.0.mlp.up_proj", 64),        # Linear 64 -> 96, no bias
    "llama-down": (tiny_llama, "model.layers.0.mlp.down_proj", 96),    # Linear 96 -> 64
    "gpt2-c_attn": (tiny_gpt2, "transformer.h.0.attn.c_attn", 64),     # Conv1D 64 -> 192, bias
    "gpt2-c_proj": (tiny_gpt2, "transformer.h.0.mlp.c_proj", 256),     # Conv1D 256 -> 64, bias
    "bert-intermediate": (tiny_bert, "bert.encoder.layer.0.intermediate.dense", 64),  # Linear 64 -> 96, bias
}


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_weight_path_equals_explicit_formula_and_direct(registry, name, side):
    factory, path, in_f = LAYERS[name]
    layer = factory().get_submodule(path)
    x = torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(3))
    got = run_layer(registry, layer, "weight", side, x)
    host = got[-1]
    base = host.base_layer
    bias = getattr(base, "bias", None)
    a = host.lorma_A.detach().clone().requires_grad_()
    b = host.lorma_B.detach().clone().requires_grad_()
    xe = x.double().requires_grad_()
    expected = explicit_output(xe, a, b, 1.5, canonical(base).detach(), None if bias is None else bias.detach(), side)
    expected.pow(2).sum().backward()
    direct = run_layer(registry, factory().get_submodule(path), "direct", side, x)
    for value, want, ref in zip(got[:4], (expected, xe.grad, a.grad, b.grad), direct[:4]):
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_recomputing_w_star_gives_the_same_gradients(registry, side):
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(4))
    kept = run_layer(registry, Conv1D(20, 12), "weight", side, x, recompute=False)
    torch.manual_seed(0)
    layer = Conv1D(20, 12)
    layer.load_state_dict(kept[-1].base_layer.state_dict())
    rebuilt = run_layer(registry, layer, "weight", side, x, recompute=True)
    for u, v in zip(kept[:4], rebuilt[:4]):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_trainable_bias_gets_its_gradient():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 10, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(10, 3, generator=gen, dtype=torch.float64).requires_grad_()
    w0 = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, a_, b_, bias_: pi_weight_linear(x_, a_, b_, 0.7, w0, bias_, "pre"),
                                    (x.requires_grad_(), a, b, bias))


# ---------------------------------------------------------------------- selector
def test_auto_picks_weight_for_wide_output_and_many_tokens(registry):
    # out = 4·in: direct pays 3·N·out² for T(W0 x); weight pays 3·N·out·in + 2·out²·in
    wide = nn.Sequential(nn.Linear(16, 64))
    modapt.apply(wide, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 4, "inflation": "pi"}]},
                 registry=registry)
    host = wide[0]
    many = torch.randn(512, 16, requires_grad=True)
    assert pi_path.choose(64, 16, "pre", 4, 512, training=True) == "weight"
    assert host.update.layer_output(many, host.base_layer) is not None
    assert host.update.layer_output(many[:2], host.base_layer) is None  # 2 tokens: out·in·d > 2 GEMMs of N·d²
    # narrow output (out = in / 4): T is 16×16, applying it to W0 x is cheaper than rebuilding W0
    narrow = nn.Sequential(nn.Linear(64, 16))
    modapt.apply(narrow, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 4, "inflation": "pi"}]},
                 registry=registry)
    assert pi_path.choose(16, 64, "pre", 4, 512, training=True) == "direct"
    assert narrow[0].update.layer_output(torch.randn(512, 64, requires_grad=True), narrow[0].base_layer) is None


def test_cost_model_formulas_and_thresholds():
    n, o, i, r = 1000, 300, 100, 8
    c = pi_path.costs(o, i, "pre", r, n, training=True)
    assert c["direct"] == 2 * n * o * i + 3 * n * o * o + 3 * r * o * o
    assert c["weight"] == 3 * n * o * i + 2 * o * i * o + 3 * r * o * o
    c_post = pi_path.costs(o, i, "post", r, n, training=True, recompute=True)
    assert c_post["weight"] == 3 * n * o * i + 3 * o * i * i + 3 * r * i * i
    assert c_post["direct"] == 4 * n * o * i + 3 * n * i * i + 3 * r * i * i
    # pre, weight beats direct once N·(3·out − in) > 2·out·in: for 5632 × 2048 that is N > 1553
    assert pi_path.weight_threshold(5632, 2048, "pre", 16) == 2 * 5632 * 2048 // (3 * 5632 - 2048) + 1
    assert pi_path.weight_threshold(256, 2048, "pre", 16) is None  # 3·out < in: never
    # the 1B LLaMA shape at 8 × 1024 tokens, r = 16, pre: what auto picks per projection
    picks = {name: pi_path.choose(o_, i_, "pre", 16, 8192, training=True) for name, (o_, i_) in {
        "q": (2048, 2048), "k": (256, 2048), "o": (2048, 2048), "gate": (5632, 2048), "down": (2048, 5632)}.items()}
    assert picks == {"q": "weight", "k": "direct", "o": "weight", "gate": "weight", "down": "direct"}
    # a single token (generation, no graph): fft's r·d·log d beats building anything d×d
    assert pi_path.choose(2048, 2048, "pre", 16, 1, training=False) == "fft"
    # deterministic: a tie goes to the first of direct, weight, fft
    assert pi_path.choose(8, 8, "pre", 1, 1, training=False, allowed=("weight", "direct")) in ("direct", "weight")
    assert pi_path.choose(8, 8, "pre", 1, 1, training=False) == pi_path.choose(8, 8, "pre", 1, 1, training=False)


# ---------------------------------------------------------------------- where it does not apply
def test_dropout_with_explicit_weight_is_refused(registry):
    with pytest.raises(modapt.RecipeError, match="pi_path = 'weight' cannot apply dropout"):
        modapt.apply(nn.Sequential(nn.Linear(8, 8)), {"adapter": [{"method": "lorma", "targets": ["0"], "r": 2,
                     "inflation": "pi", "pi_path": "weight", "dropout": 0.1}]}, registry=registry)


def test_auto_with_dropout_uses_the_weight_path_only_in_eval(registry):
    net = nn.Sequential(nn.Linear(16, 64))
    modapt.apply(net, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 4, "inflation": "pi",
                                    "dropout": 0.5}]}, registry=registry)
    host = net[0]
    x = torch.randn(512, 16)
    net.train()
    assert host.update.layer_output(x.requires_grad_(), host.base_layer) is None  # dropout acts on T's input
    net.eval()
    with torch.no_grad():
        whole = host.update.layer_output(x, host.base_layer)
        assert whole is not None
        torch.testing.assert_close(whole, host.base_layer(x) + host.update.forward(x, host.base_layer(x),
                                                                                    host.base_layer))


def test_embedding_with_weight_falls_back_to_direct(registry):
    emb = nn.Embedding(30, 8)
    net = nn.Sequential(emb)
    modapt.apply(net, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 2, "inflation": "pi",
                                    "pi_path": "weight"}]}, registry=registry)
    randomise(net[0])
    ids = torch.tensor([[1, 5, 29], [0, 3, 3]])
    assert net[0].update.layer_output(ids, emb) is None
    a, b = net[0].lorma_A.detach(), net[0].lorma_B.detach()
    t = 4.0 * (b @ a).gather(1, rotation_index(8))
    torch.testing.assert_close(net(ids), (t @ emb.weight.detach().t()).t()[ids], rtol=1e-5, atol=1e-6)


def test_map_over_lorma_pi_weight_uses_delta_x(registry):
    """MAP needs ΔW x apart: it never calls layer_output, so explicit 'weight' runs direct there."""
    import modapt_map.plugin

    registry.register_plugin(modapt_map.plugin, name="map", distribution="modapt-map")
    results = []
    for path in ("weight", "direct"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 20))
        modapt.apply(net, {"adapter": [{"method": "map", "targets": ["0"], "update": {
            "method": "lorma", "r": 3, "inflation": "pi", "pi_path": path}}]}, registry=registry)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in modapt.trainable_parameters(net).values():
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
        out = net(x)
        out.pow(2).sum().backward()
        grads = [p.grad.clone() for p in modapt.trainable_parameters(net).values()]
        with torch.no_grad():
            modapt.merge(net, unload=True)
            torch.testing.assert_close(net(x), out, rtol=1e-5, atol=1e-5)
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for u, v in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


# ---------------------------------------------------------------------- merge, dtypes, whole models
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_merge_equals_unmerged_weight_path(registry, factory):
    model = modapt.apply(factory(), {"adapter": [{"method": "lorma", "targets": "all-linear", "r": 4,
                                                  "inflation": "pi", "pi_path": "weight"}]}, registry=registry)
    for host in modapt.state_of(model).layers.values():
        randomise(host, seed=7)
    inputs = tiny_inputs()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in modapt.trainable_parameters(model).values())
    with torch.no_grad():
        unmerged = model(**inputs).logits
        modapt.merge(model, unload=False)
        torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=1e-4, atol=1e-4)
        modapt.unmerge(model)
        assert torch.equal(model(**inputs).logits, unmerged)


def test_bf16_base_with_fp32_adapters_matches_direct(registry):
    """The dtypes of the direct path: T and W* in fp32 (the parameters'), the GEMM in the base's bf16."""
    outs = {}
    for path in ("weight", "direct"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 48)).to(torch.bfloat16)
        modapt.apply(net, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 4, "inflation": "pi",
                                        "pi_path": path}]}, registry=registry)
        host = net[0]
        assert host.lorma_A.dtype == torch.float32
        randomise(host)
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
        out = net(x)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        assert host.lorma_A.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
        outs[path] = (out.float(), x.grad.float(), host.lorma_A.grad, host.lorma_B.grad)
        if path == "weight":
            # the forward is the merged layer's up to W*'s rounding: merge builds T·W0 in fp32 and rounds it
            # once to bf16, the weight path from one bf16 GEMM over T's two bf16 parts (~16 bits of T); both
            # as close to the float64 layer
            with torch.no_grad():
                merged = nn.functional.linear(x, host.merged_weight(), host.base_layer.bias).double()
                w0, bias = host.base_layer.weight.double(), host.base_layer.bias.double()
                exact = explicit_output(x.double(), host.lorma_A.double(), host.lorma_B.double(),
                                        host.update.scaling, w0, bias, "pre")
            err_weight = float((out.detach().double() - exact).norm() / exact.norm())
            err_merged = float((merged - exact).norm() / exact.norm())
            assert err_weight <= 1.05 * err_merged, (err_weight, err_merged)
    for u, v in zip(outs["weight"], outs["direct"]):
        torch.testing.assert_close(u, v, rtol=3e-2, atol=3e-2 * v.abs().max().item())


def test_autocast_matches_direct(registry):
    outs = {}
    for path in ("weight", "direct"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 48))
        modapt.apply(net, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 4, "inflation": "pi",
                                        "pi_path": path}]}, registry=registry)
        randomise(net[0])
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        assert x.grad.dtype == torch.float32 and net[0].lorma_B.grad.dtype == torch.float32
        outs[path] = (out.float(), x.grad, net[0].lorma_A.grad, net[0].lorma_B.grad)
    for u, v in zip(outs["weight"], outs["direct"]):
        torch.testing.assert_close(u, v, rtol=5e-2, atol=5e-2 * v.abs().max().item())


def test_build_in_base_dtype_switch_stays_close_to_fp32_build(registry):
    """The experiment switch: T and W* in the bf16 base's dtype; same W within bf16 rounding."""
    outs = []
    for switch in (False, True):
        with modapt.fast_paths(lorma_build_in_base_dtype=switch):
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(32, 48)).to(torch.bfloat16)
            modapt.apply(net, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 4, "inflation": "pi",
                                            "pi_path": "weight"}]}, registry=registry)
            randomise(net[0])
            x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
            out = net(x)
            out.float().pow(2).sum().backward()
            assert out.dtype == torch.bfloat16 and net[0].lorma_A.grad.dtype == torch.float32
            outs.append((out.float(), x.grad.float(), net[0].lorma_A.grad, net[0].lorma_B.grad))
    assert not torch.equal(outs[0][0], outs[1][0])  # the switch changes the rounding
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=3e-2, atol=3e-2 * v.abs().max().item())


@pytest.mark.parametrize("regime", ["near the identity", "far from it", "near zero"])
def test_bf16_weight_is_the_fp32_build_for_any_t(regime):
    """W* for a float32 T over a bf16 W0, from one bf16 GEMM over T's two bf16 parts: the fp32 build
    T·W0 rounded to bf16 in almost every entry, and no further from float64, near T = I (where
    training starts), far from it, and near T = 0 (where subtracting I first would cancel)."""
    from modapt_lorma.weight_path import _t_matrix, _weight

    gen = torch.Generator().manual_seed(2)
    d, n_in, r = 64, 96, 4
    w0 = torch.randn(d, n_in, generator=gen).to(torch.bfloat16)
    a = torch.randn(r, d, generator=gen) * 0.1
    b = torch.randn(d, r, generator=gen) * 0.01
    if regime == "near the identity":
        b[:, 0] += 1.0  # column 0 of B A lands on T's diagonal: T = I + small
        a[0] = 0.0
        a[0, 0] = 1.0
    elif regime == "far from it":
        a, b = a * 10.0, b * 100.0
    t64 = (b.double() @ a.double()).gather(1, rotation_index(d))
    eye = torch.eye(d, dtype=torch.float64)
    distance = float((t64 - eye).abs().max())
    assert distance < 0.05 if regime == "near the identity" else distance > 0.9
    exact = t64 @ w0.double()
    with torch.no_grad():
        fp32_build = _weight(_t_matrix(a, b, 1.0, torch.float32), w0, True, torch.float32, torch.float32)
        fp32_build = fp32_build.to(torch.bfloat16)
        split = _weight(_t_matrix(a, b, 1.0, torch.float32), w0, True, torch.float32, torch.bfloat16)
        w0_post = w0.t().contiguous()  # post: W* = W0·T for a [in, d] W0
        post = _weight(_t_matrix(a, b, 1.0, torch.float32), w0_post, False, torch.float32, torch.bfloat16)
        post_fp32 = _weight(_t_matrix(a, b, 1.0, torch.float32), w0_post, False, torch.float32, torch.float32)
    assert split.dtype == torch.bfloat16
    exact_post = w0_post.double() @ t64
    for got, fp32, want in ((split, fp32_build, exact), (post, post_fp32.to(torch.bfloat16), exact_post)):
        assert float((got != fp32).float().mean()) < 0.01
        err = [float((w.double() - want).norm() / want.norm()) for w in (got, fp32)]
        assert err[0] <= err[1] * 1.001, err


@pytest.mark.parametrize("device_has_it", [True, False])
def test_grad_t_float32_output_gemm_and_its_fallback(monkeypatch, device_has_it):
    """∂T from the bf16 ∂W* and W0: one GEMM with float32 output where the device has it (CUDA; emulated
    by a ``torch.mm`` that takes ``out_dtype``), else the float32 product of upcast copies; the same
    numbers (bf16 products are exact in float32), pre and post."""
    from modapt import float32_gemm
    from modapt.testing.float32_gemm import emulate_float32_mm
    from modapt_lorma import weight_path

    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(48, 32, generator=gen).to(torch.bfloat16)
    grad_w = torch.randn(48, 32, generator=gen).to(torch.bfloat16)
    calls = emulate_float32_mm(monkeypatch, device_has_it)
    for pre in (True, False):
        got = weight_path._grad_t(grad_w, w0, pre, torch.float32)
        want = grad_w.double() @ w0.double().t() if pre else w0.double().t() @ grad_w.double()
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert calls == [torch.float32] * (2 if device_has_it else 1)
    assert float32_gemm.available("cpu") is device_has_it
