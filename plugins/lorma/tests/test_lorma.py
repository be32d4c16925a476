"""LoRMA against the formulas written out with explicit matrices (issue 16's "done when")."""

import math

import modapt
import pytest
import torch
from modapt.testing import tiny_gpt2, tiny_inputs, tiny_llama
from modapt_lorma import pi_path
from modapt_lorma.inflation import pi_apply_direct, pi_apply_fft, rotate_rows
from torch import nn
from transformers.pytorch_utils import Conv1D

INFLATIONS = ("plus", "pi", "none")
SIDES = ("pre", "post")
SHAPES = [(24, 24), (20, 12), (12, 20)]  # (out, in): square, tall, wide


# ---------------------------------------------------------------------- explicit formulas
def rotate_rows_loop(m):
    """Iπ(M)[i, j] = M[i, (j − i) mod d], element by element."""
    d = m.shape[0]
    out = torch.empty_like(m)
    for i in range(d):
        for j in range(d):
            out[i, j] = m[i, (j - i) % d]
    return out


def explicit_t(a, b, scaling, inflation):
    """T [d, d] as the paper writes it (eq. 8: I + s·BA; eq. 7: s·Iπ(BA); the uninflated s·BA)."""
    a, b = a.detach().double(), b.detach().double()
    d = a.shape[1]
    if inflation == "plus":
        return torch.eye(d, dtype=torch.float64) + scaling * (b @ a)
    if inflation == "pi":
        return scaling * rotate_rows_loop(b @ a)
    return scaling * (b @ a)


def explicit_weight(w0, t, side):
    w0 = w0.detach().double()
    return t @ w0 if side == "pre" else w0 @ t


class Net(nn.Module):
    def __init__(self, out_f, in_f, kind="linear", bias=True):
        super().__init__()
        if kind == "linear":
            self.proj = nn.Linear(in_f, out_f, bias=bias)
        else:
            self.proj = Conv1D(out_f, in_f)  # weight [in, out]
            nn.init.normal_(self.proj.weight, std=0.2)
            nn.init.normal_(self.proj.bias, std=0.2)

    def forward(self, x):
        return self.proj(x)


def adapted_net(registry, out_f, in_f, kind="linear", seed=0, bias=True, **options):
    torch.manual_seed(seed)
    net = Net(out_f, in_f, kind, bias)
    entry = {"method": "lorma", "targets": ["proj"], "r": 4, "lora_alpha": 6.0, **options}
    return modapt.apply(net, {"adapter": [entry]}, registry=registry)


@torch.no_grad()
def randomise(host, seed=1):
    gen = torch.Generator().manual_seed(seed)
    host.lorma_A.copy_(torch.randn(host.lorma_A.shape, generator=gen) * 0.3)
    host.lorma_B.copy_(torch.randn(host.lorma_B.shape, generator=gen) * 0.3)


def canonical(layer):
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", INFLATIONS)
def test_forward_equals_explicit_matrices(registry, inflation, side, shape, kind):
    out_f, in_f = shape
    paths = ("direct", "fft", "weight", "auto") if inflation == "pi" else ("auto",)
    for path in paths:
        net = adapted_net(registry, out_f, in_f, kind, inflation=inflation, side=side, pi_path=path)
        host = net.proj
        randomise(host)
        d = out_f if side == "pre" else in_f
        assert host.lorma_A.shape == (4, d) and host.lorma_B.shape == (d, 4)
        x = torch.randn(3, 5, in_f)
        t = explicit_t(host.lorma_A, host.lorma_B, 6.0 / 4, inflation)
        w = explicit_weight(canonical(host.base_layer), t, side)
        expected = x.double() @ w.t() + host.base_layer.bias.detach().double()
        got = net(x)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        # the update alone is ΔW x, bias excluded
        delta = host.update.delta_weight(canonical(host.base_layer).detach())
        torch.testing.assert_close(delta.double(), w - canonical(host.base_layer).double(), rtol=1e-5, atol=1e-6)


def test_forward_without_bias(registry):
    net = adapted_net(registry, 16, 16, bias=False, inflation="pi", pi_path="direct")
    randomise(net.proj)
    x = torch.randn(4, 16)
    t = explicit_t(net.proj.lorma_A, net.proj.lorma_B, 1.5, "pi")
    torch.testing.assert_close(net(x).double(), x.double() @ (t @ net.proj.weight.double()).t(), rtol=1e-5,
                               atol=1e-6)


def test_rotate_rows_matches_loop_and_inflates_rank():
    m = torch.randn(7, 7, dtype=torch.float64)
    torch.testing.assert_close(rotate_rows(m), rotate_rows_loop(m), rtol=0, atol=0)
    ones_first = torch.zeros(5, 5)
    ones_first[:, 0] = 1.0  # rank 1; rotated it is I (paper Fig. 3)
    assert torch.equal(rotate_rows(ones_first), torch.eye(5))
    grad_input = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rotate_rows, (grad_input,))  # the custom backward (inverse rotation)
    rank_one = torch.outer(torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64))
    assert torch.linalg.matrix_rank(rotate_rows(rank_one)) > 8


@pytest.mark.parametrize("d", [7, 16, 33, 128])
def test_direct_and_fft_agree_with_gradients(d):
    gen = torch.Generator().manual_seed(d)
    a = (torch.randn(4, d, generator=gen) * 0.2).requires_grad_()
    b = (torch.randn(d, 4, generator=gen) * 0.2).requires_grad_()
    y = torch.randn(2, 9, d, generator=gen, requires_grad=True)
    direct = pi_apply_direct(a, b, 1.7, y)
    grads_direct = torch.autograd.grad(direct.pow(2).sum(), (a, b, y))
    fft = pi_apply_fft(a, b, 1.7, y)
    grads_fft = torch.autograd.grad(fft.pow(2).sum(), (a, b, y))
    scale = direct.abs().max().item()
    torch.testing.assert_close(fft, direct, rtol=1e-5, atol=1e-5 * scale)
    for g_fft, g_direct in zip(grads_fft, grads_direct):
        torch.testing.assert_close(g_fft, g_direct, rtol=1e-5, atol=1e-5 * g_direct.abs().max().item())


def test_fft_path_upcasts_bfloat16():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, generator=gen) * 0.2, torch.randn(64, 4, generator=gen) * 0.2
    y = torch.randn(8, 64, generator=gen)
    out = pi_apply_fft(a, b, 2.0, y.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pi_apply_direct(a, b, 2.0, y.bfloat16().float()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- init
@pytest.mark.parametrize("inflation,side,factory,targets", [
    ("plus", "post", tiny_llama, ["q_proj", "v_proj", "up_proj", "down_proj"]),
    ("pi", "pre", tiny_llama, ["q_proj", "v_proj", "up_proj", "down_proj"]),
    ("pi", "post", tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),
])  # plus-pre, pi-pre (GPT-2) and plus-post (BERT) run in the conformance suite
def test_identity_at_init(registry, inflation, side, factory, targets):
    base = factory()
    entry = {"method": "lorma", "targets": targets, "r": 4, "lora_alpha": 32.0, "inflation": inflation, "side": side}
    model = modapt.apply(factory(), {"adapter": [entry]}, registry=registry)
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, atol=1e-6, rtol=0)
    for host in modapt.state_of(model).layers.values():
        torch.testing.assert_close(host.update.transform(), torch.eye(host.update.d), atol=1e-6, rtol=0)


def test_pi_init_formula(registry):
    net = adapted_net(registry, 10, 10, inflation="pi", lora_alpha=8.0)  # s = 2
    a, b = net.proj.lorma_A.detach(), net.proj.lorma_B.detach()
    root = math.sqrt(2.0)
    torch.testing.assert_close(b[:, 0], torch.full((10,), 1 / root))
    expected_a = torch.zeros(4, 10)
    expected_a[0, 0] = 1 / root
    torch.testing.assert_close(a, expected_a)
    assert b[:, 1:].abs().sum() > 0  # the rest of B is random, so A's other rows get gradients


def test_none_cannot_start_at_identity(registry):
    net = adapted_net(registry, 12, 12, inflation="none")
    assert torch.linalg.matrix_rank(net.proj.update.transform().detach()) == 4  # float32 tolerance
    t = net.proj.update.transform().double()
    torch.testing.assert_close(t @ t, t, atol=1e-6, rtol=0)  # the orthogonal projection of our init
    assert ((t - torch.eye(12, dtype=torch.float64)).norm() ** 2).item() == pytest.approx(12 - 4, rel=1e-5)


# ---------------------------------------------------------------------- norms, factors
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", INFLATIONS)
def test_frobenius_and_factors(registry, inflation, side, shape):
    net = adapted_net(registry, *shape, inflation=inflation, side=side)
    host = net.proj
    randomise(host)
    w0 = host.base_layer.weight.detach()
    delta = explicit_weight(w0, explicit_t(host.lorma_A, host.lorma_B, 1.5, inflation), side) - w0.double()
    norm = host.update.frobenius_sq(w0)
    factors = host.update.factors()
    if inflation == "pi":
        assert norm is None and factors is None
        return
    assert norm.requires_grad
    assert norm.item() == pytest.approx(delta.pow(2).sum().item(), rel=1e-5)
    if inflation == "plus":
        left, right = factors
        assert left.shape[0] == shape[0] and right.shape[1] == shape[1]
        torch.testing.assert_close((left @ right).double(), delta, rtol=1e-5, atol=1e-6)
    else:
        assert factors is None


def test_factors_use_w0_while_merged(registry):
    net = adapted_net(registry, 12, 12, side="pre")
    randomise(net.proj)
    before = [f.detach().clone() for f in net.proj.update.factors()]
    with torch.no_grad():
        modapt.merge(net, unload=False)
    after = net.proj.update.factors()
    for x, y in zip(before, after):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------- merge, save, load
class TwoLayers(nn.Module):
    """A Linear (tall) and a Conv1D (wide): both storage layouts, both non-square."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = Conv1D(12, 20)
        nn.init.normal_(self.down.weight, std=0.2)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", INFLATIONS)
def test_merge_unmerge_round_trip(registry, inflation, side):
    torch.manual_seed(0)
    base = TwoLayers()
    model = TwoLayers()
    model.load_state_dict(base.state_dict())
    entry = {"method": "lorma", "targets": ["up", "down"], "r": 4, "inflation": inflation, "side": side}
    modapt.apply(model, {"adapter": [entry]}, registry=registry)
    for host in modapt.state_of(model).layers.values():
        randomise(host)
    x = torch.randn(3, 7, 12)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        expected = model(x)
        modapt.merge(model, unload=False)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        modapt.unmerge(model)
        for name, p in model.named_parameters():
            if name in originals:
                assert torch.equal(p, originals[name])
        assert torch.equal(model(x), expected)
        modapt.merge(model, unload=True)
        assert isinstance(model.up, nn.Linear) and isinstance(model.down, Conv1D)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x), base(x), atol=1e-3)


def test_save_load(registry, tmp_path):
    entry = {"method": "lorma", "targets": ["q_proj", "up_proj"], "r": 4, "inflation": "pi", "side": "post"}
    model = modapt.apply(tiny_llama(), {"adapter": [entry]}, registry=registry)
    for host in modapt.state_of(model).layers.values():
        randomise(host)
    names = set(modapt.adapter_state_dict(model))
    assert "model.layers.0.mlp.up_proj.lorma_A" in names and "model.layers.0.mlp.up_proj.lorma_B" in names
    modapt.save(model, tmp_path / "a", registry=registry)
    fresh = modapt.load(tiny_llama(), tmp_path / "a", registry=registry)
    inputs = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


# ---------------------------------------------------------------------- embeddings, errors
def test_embedding_pre(registry):
    emb = nn.Embedding(30, 8)
    net = nn.Sequential(emb)
    modapt.apply(net, {"adapter": [{"method": "lorma", "targets": ["0"], "r": 2, "inflation": "pi"}]},
                 registry=registry)
    host = net[0]
    randomise(host)
    ids = torch.tensor([[1, 5, 29], [0, 3, 3]])
    t = explicit_t(host.lorma_A, host.lorma_B, 4.0, "pi")
    table = (t @ emb.weight.detach().double().t()).t()  # canonical W0 is [dim, num_embeddings]
    torch.testing.assert_close(net(ids).double(), table[ids], rtol=1e-5, atol=1e-6)


def test_embedding_post_is_refused(registry):
    net = nn.Sequential(nn.Embedding(30, 8))
    with pytest.raises(modapt.RecipeError, match="side = 'post' on an embedding"):
        modapt.apply(net, {"adapter": [{"method": "lorma", "targets": ["0"], "side": "post"}]}, registry=registry)
    assert isinstance(net[0], nn.Embedding)


def test_rank_larger_than_d_is_refused(registry):
    with pytest.raises(modapt.RecipeError, match="r = 16 exceeds d = 12"):
        adapted_net(registry, 12, 40, r=16)
    adapted_net(registry, 12, 40, r=16, side="post")  # d = in = 40 there


@pytest.mark.parametrize("key,value,accepted", [("inflation", "plsu", "'plus', 'pi' or 'none'"),
                                                ("side", "left", "'pre' or 'post'"),
                                                ("pi_path", "gpu", "'auto', 'direct', 'fft' or 'weight'")])
def test_bad_options_name_the_accepted_values(registry, key, value, accepted):
    with pytest.raises(modapt.RecipeError) as info:
        modapt.parse_recipe({"adapter": [{"method": "lorma", "targets": ["q_proj"], key: value}]}, registry)
    assert key in str(info.value) and accepted in str(info.value)


# ---------------------------------------------------------------------- selector
def test_selector_fft_constant_matches_the_cpu_table():
    """K (MACs per N·r·d·log2 d unit of fft) against the recorded CPU rows: fft_ms/unit ÷ direct_ms/MAC."""
    direct_per_mac = sorted(ms / (3 * n * d * d) for d, _, n, ms, _ in pi_path.MEASURED_CPU if n >= 256)
    fft_per_unit = sorted(ms / (n * r * d * math.log2(d)) for d, r, n, _, ms in pi_path.MEASURED_CPU if n >= 256)
    k = fft_per_unit[len(fft_per_unit) // 2] / direct_per_mac[len(direct_per_mac) // 2]
    assert 0.5 * pi_path.FFT_MACS_PER_UNIT < k < 2 * pi_path.FFT_MACS_PER_UNIT
    # with 256 tokens and r = 8, direct vs fft flips near d / log2(d) = K·r / 3, as the table shows
    assert pi_path.choose(512, 512, "pre", 8, 256, training=True, allowed=("direct", "fft")) == "direct"
    assert pi_path.choose(4096, 4096, "pre", 8, 256, training=True, allowed=("direct", "fft")) == "fft"
