"""Weight methods on quantized bases (issue 34): bitsandbytes 4-bit (nf4, fp4), 8-bit, torchao int8.

Each method's output on a quantized layer is checked against its formula written out here,
with W0·x taken from the quantized layer's own call and W0 (where a formula needs it)
dequantized by the quantization library itself, not by modapt; LoRA and DoRA against PEFT on
the same quantized model; gradients; save → load onto a freshly quantized base; merges.
"""

from __future__ import annotations

import json

import modapt
import pytest
import torch
from modapt.errors import AdapterLoadError, TargetError
from modapt.testing.models import tiny_inputs
from modapt.testing.quantized_models import QUANTIZED_BASES, available, quantized_tiny_llama

KINDS = [k for k in QUANTIZED_BASES if k != "bnb-fp4"]  # fp4 shares nf4's code path: checked once below
for _kind in QUANTIZED_BASES:
    if available(_kind):
        pytest.skip(available(_kind), allow_module_level=True)

TARGETS = ["q_proj", "v_proj", "down_proj"]
RECIPES = {
    "lora": {"method": "lora", "r": 4, "lora_alpha": 8},
    "dora": {"method": "dora", "update": {"method": "lora", "r": 4, "lora_alpha": 8}},
    "lomap": {"method": "map", "update": {"method": "lora", "r": 4, "lora_alpha": 8}},
    "lorma_plus": {"method": "lorma", "r": 4, "lora_alpha": 8, "inflation": "plus"},
    "adalora": {"method": "adalora", "init_r": 6, "target_r": 3, "lora_alpha": 8, "total_step": 100},
    "flora": {"method": "flora", "r": 4, "lora_alpha": 8},
    "quanta": {"method": "quanta"},
}


def recipe(method: str) -> dict:
    return {"adapter": [{**RECIPES[method], "targets": TARGETS}]}


def dequantized(layer) -> torch.Tensor:
    """W0 [out, in] float32 by the quantization library's own dequantization (not modapt's)."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scb).float()
    return layer.weight.dequantize().float()


def randomize(model, seed: int = 0) -> None:
    """Every adapter tensor away from its init (B = 0, Λ = 0 would hide half of a formula)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in modapt.trainable_parameters(model).items():
            noise = torch.rand(p.shape, generator=gen)
            if p.dim() == 0:
                p.add_(0.3 + 0.4 * noise)  # MAP's α and β (β starts at 0): positive
            elif name.endswith("lora_magnitude_vector"):
                p.mul_(0.8 + 0.4 * noise)  # DoRA's m: positive, near its init
            else:
                p.copy_((noise - 0.5) * 0.4)


def formula(method: str, host, x: torch.Tensor) -> torch.Tensor:
    """The method's output on ``host`` for x [..., in], from the paper's formula (float32)."""
    base = host.base_layer
    base_out = base(x).float()  # W0 x + b by the quantized layer itself (LLaMA: no bias)
    w0 = dequantized(base)
    if method in ("lora", "dora", "lomap"):
        s = 8 / 4
        delta_w = s * host.lora_B.weight @ host.lora_A.weight
        delta_x = s * (x @ host.lora_A.weight.t()) @ host.lora_B.weight.t()
        if method == "lora":
            return base_out + delta_x
        if method == "dora":  # m ⊙ (W0 + ΔW) x / ‖W0 + ΔW‖_row
            norm = torch.linalg.vector_norm(w0 + delta_w, dim=1)
            return (host.lora_magnitude_vector / norm) * (base_out + delta_x)
        # MAP: α·W0/‖W0‖_F + β·ΔW/‖ΔW‖_F
        return (host.map_alpha / torch.linalg.vector_norm(w0)) * base_out \
            + (host.map_beta / torch.linalg.vector_norm(delta_w)) * delta_x
    if method == "lorma_plus":  # (I + s·B A) W0 x: T acts on the base output
        return base_out + (8 / 4) * (base_out @ host.lorma_A.t()) @ host.lorma_B.t()
    if method == "adalora":  # P diag(Λ) Q x · α / r
        c = host.update.scale
        return base_out + ((x @ host.lora_A.t()) * (host.lora_E.t() * c)) @ host.lora_B.t()
    if method == "flora":  # s · B G A x
        return base_out + (8 / 4) * ((x @ host.flora_A.t()) @ host.flora_G.t()) @ host.flora_B.t()
    # QuanTA: ΔW from its own dense form (checked against the paper's einsum in plugins/quanta)
    return base_out + x @ host.update.delta_weight(w0).t()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("kind", KINDS)
def test_method_on_quantized_base(kind, method, tmp_path):
    """Formula with W0·x from the quantized layer; grads on every adapter tensor and none on the
    base; save → load onto a freshly quantized base gives the same logits."""
    model = modapt.apply(quantized_tiny_llama(kind), recipe(method))
    randomize(model)
    host = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = host(x).float(), formula(method, host, x)
    err = (got - want).abs().max() / want.abs().max()
    assert err <= 1e-5, f"{kind} {method}: relative error {err:.2e}"
    trainable = modapt.trainable_parameters(model)
    assert {p.dtype for p in trainable.values()} == {torch.float32}

    inputs = tiny_inputs()
    model.train()
    model(**inputs).logits.float().pow(2).mean().backward()
    for name, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)

    model.eval()
    expected = logits(model, inputs)
    modapt.save(model, tmp_path / "adapter")
    config = modapt.persistence.read_config(tmp_path / "adapter")
    assert {t["dtype"] for t in config["base_fingerprint"]["tensors"].values()} == {
        "quantized:" + ("torchao" if kind.startswith("torchao") else
                        "bitsandbytes-8bit" if kind == "bnb-int8" else "bitsandbytes-4bit")}
    fresh = modapt.load(quantized_tiny_llama(kind), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, inputs), expected, rtol=0, atol=0)


def test_fp4_without_double_quant_lomap():
    """fp4 and no nested quantization state: the same kind, another dequantization."""
    model = modapt.apply(quantized_tiny_llama("bnb-fp4"), recipe("lomap"))
    randomize(model)
    host = model.model.layers[0].self_attn.q_proj
    assert host.base_layer.weight.quant_state.nested is False
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = host(x), formula("lomap", host, x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated without")  # PEFT: merge needs TorchAoConfig
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_equals_peft_on_the_same_quantized_model(kind, method):
    """PEFT 0.21 wraps the same quantized layers with its own bnb/torchao LoRA layers."""
    from peft import LoraConfig, get_peft_model

    ours = modapt.apply(quantized_tiny_llama(kind), recipe(method))
    randomize(ours)
    theirs = get_peft_model(quantized_tiny_llama(kind), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=method == "dora", init_lora_weights=False))
    with torch.no_grad():
        peft_params = dict(theirs.named_parameters())
        for name, p in modapt.trainable_parameters(ours).items():
            path, _, key = name.rpartition(".lora_")
            key = "lora_" + key
            if key == "lora_magnitude_vector":
                target = f"base_model.model.{path}.lora_magnitude_vector.default.weight"
            else:
                target = f"base_model.model.{path}.{key.replace('.weight', '.default.weight')}"
            peft_params[target].copy_(p)
    inputs = tiny_inputs()
    want = logits(theirs, inputs)
    got = logits(ours, inputs)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_float_and_quantized_fingerprints_refuse_each_other_unless_asked(tmp_path):
    from modapt.testing.models import tiny_llama

    model = modapt.apply(quantized_tiny_llama("bnb-nf4"), recipe("lora"))
    randomize(model)
    modapt.save(model, tmp_path / "nf4")
    with pytest.raises(AdapterLoadError, match=r"is not quantized \(float32\).*quantized \(bitsandbytes-4bit\)"
                                               r".*verify_base=False"):
        modapt.load(tiny_llama(), tmp_path / "nf4")
    with pytest.raises(AdapterLoadError, match="other values"):  # another quantization of the same weights
        modapt.load(quantized_tiny_llama("bnb-fp4"), tmp_path / "nf4")
    with pytest.raises(AdapterLoadError, match="other values"):  # another base, same quantization
        modapt.load(quantized_tiny_llama("bnb-nf4", seed=1), tmp_path / "nf4")
    on_float = modapt.load(tiny_llama(), tmp_path / "nf4", verify_base=False)
    host = on_float.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(host.lora_B.weight, model.model.layers[0].self_attn.q_proj.lora_B.weight)

    modapt.save(on_float, tmp_path / "float")
    with pytest.raises(AdapterLoadError, match="verify_base=False"):
        modapt.load(quantized_tiny_llama("bnb-int8"), tmp_path / "float")
    modapt.load(quantized_tiny_llama("bnb-int8"), tmp_path / "float", verify_base=False)


def test_unsupported_quantized_layer_is_refused_naming_path_class_and_kinds():
    class QuantLinear(torch.nn.Module):  # a GPTQ-style layer no kind covers
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(8, 64, dtype=torch.int32))

    model = quantized_tiny_llama("bnb-nf4")
    model.model.layers[0].self_attn.q_proj = QuantLinear()
    kinds = "supported quantized kinds: bitsandbytes-4bit, bitsandbytes-8bit, torchao"
    with pytest.raises(TargetError, match=r"'model.layers.0.self_attn.q_proj' is a quantized .*QuantLinear.*" + kinds):
        modapt.apply(model, recipe("lora"))
    assert not modapt.is_adapted(model)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_writes_a_dequantized_checkpoint_plain_transformers_loads(kind, tmp_path):
    """merge(unload=False) + unmerge is exact (the quantized layer itself comes back);
    merge → dequantize_model → save_pretrained → plain from_pretrained matches the adapted model."""
    from modapt.quantized import dequantize_model
    from transformers import AutoModelForCausalLM

    model = modapt.apply(quantized_tiny_llama(kind), recipe("dora"))
    randomize(model)
    inputs = tiny_inputs()
    adapted = logits(model, inputs)
    original = model.model.layers[0].self_attn.q_proj.base_layer
    modapt.merge(model, unload=False)
    merged_in_place = logits(model, inputs)
    modapt.unmerge(model)
    assert model.model.layers[0].self_attn.q_proj.base_layer is original
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=0, atol=0)

    modapt.merge(model)
    dequantize_model(model, torch.float32)
    model.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith("proj"))
    reloaded = logits(plain, inputs)
    scale = adapted.abs().max()
    # bnb 4-bit and torchao compute with the dequantized W0 (the merged model is the same
    # function up to rounding); LLM.int8 also quantizes the activations, which a merged
    # float model does not: its own error, measured at ≤ 0.95 % of max |logit| (others ≤ 5e-7)
    bound = 0.02 if kind == "bnb-int8" else 1e-5
    assert (merged_in_place - adapted).abs().max() <= bound * scale
    assert (reloaded - adapted).abs().max() <= bound * scale


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8"])
def test_cli_merge_of_a_checkpoint_saved_quantized(kind, tmp_path, capsys):
    """``modapt merge --base`` on a folder saved in 4/8-bit writes a dequantized checkpoint
    (the compute dtype, or --dtype) that plain transformers loads."""
    from modapt.cli import main
    from transformers import AutoModelForCausalLM

    base = quantized_tiny_llama(kind)
    base.save_pretrained(tmp_path / "base")
    model = modapt.apply(quantized_tiny_llama(kind), recipe("lomap"))
    randomize(model)
    modapt.save(model, tmp_path / "adapter")
    inputs = tiny_inputs()
    adapted = logits(model, inputs)
    args = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    bound = 0.02 if kind == "bnb-int8" else 1e-5
    assert (logits(plain, inputs) - adapted).abs().max() <= bound * adapted.abs().max()
    assert main([*args, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    # an adapter trained on another base is refused, with the way out named
    other = modapt.apply(quantized_tiny_llama(kind, seed=1), recipe("lomap"))
    modapt.save(other, tmp_path / "other")
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "other"),
                 "--out", str(tmp_path / "no")]) == 1
    assert "verify_base=False" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_prepare_for_kbit_training_casts_norms_and_enables_input_grads():
    from modapt.quantized import load_quantized, prepare_for_kbit_training
    from modapt.testing.quantized_models import _float_folder

    model = load_quantized(_float_folder(0), "4bit", compute_dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed weights untouched
    assert model.is_gradient_checkpointing and not any(p.requires_grad for p in model.parameters())
    modapt.apply(model, recipe("lora"))
    randomize(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**tiny_inputs()).logits.float().pow(2).mean()
    loss.backward()  # checkpointed blocks: the adapters inside get gradients through the input's grad
    grads = [p.grad for p in modapt.trainable_parameters(model).values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # merged layers hold W* in bf16 inside a float32 model (norms cast up): they are called like
    # the quantized layers were (input cast to bf16, output back); W* rounded to bf16 is the error
    model.eval()
    adapted = logits(model, tiny_inputs())
    modapt.merge(model)
    merged = logits(model, tiny_inputs())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert (merged - adapted).abs().max() <= 0.02 * adapted.abs().max()


def test_train_cli_quantize_4bit(tmp_path, capsys):
    from modapt.cli import main
    from modapt.testing.models import tiny_model_dir, write_sentiment_csv

    tiny_model_dir(tmp_path / "model")
    write_sentiment_csv(tmp_path / "data.csv")
    (tmp_path / "recipe.toml").write_text(
        'modules_to_save = ["score"]\n\n[[adapter]]\nmethod = "dora"\n'
        'targets = ["q_proj", "v_proj"]\n[adapter.update]\nmethod = "lora"\nr = 4\n')
    code = main(["train", "--recipe", str(tmp_path / "recipe.toml"), "--model", str(tmp_path / "model"),
                 "--data", str(tmp_path / "data.csv"), "--label-column", "sentiment",
                 "--out", str(tmp_path / "run"),
                 "--steps", "3", "--eval-every", "3", "--eval-limit", "8", "--batch-size", "4", "--no-progress",
                 "--quantize", "4bit"])
    assert code == 0, capsys.readouterr().err
    config = modapt.persistence.read_config(tmp_path / "run" / "last")
    dtypes = {t["dtype"] for t in config["base_fingerprint"]["tensors"].values()}
    assert dtypes == {"quantized:bitsandbytes-4bit"}


@pytest.mark.parametrize("side", ["pre", "post"])
def test_lorma_pi_takes_the_quantized_layers_own_path(side):
    """LoRMAπ: the weight path (T·W0 as one GEMM) would dequantize W0 each step, so on a quantized
    base ``pi_path = "weight"`` computes what ``direct`` does: T applied to the quantized layer's
    own output (pre), or the quantized layer applied to T x (post)."""
    outs = []
    for path in ("weight", "direct"):
        adapter = {"method": "lorma", "r": 4, "lora_alpha": 4, "inflation": "pi", "side": side,
                   "pi_path": path, "targets": ["q_proj", "v_proj"]}
        model = modapt.apply(quantized_tiny_llama("bnb-nf4"), {"adapter": [adapter]})
        randomize(model)
        host = model.model.layers[0].self_attn.q_proj
        assert host.update.layer_output(torch.zeros(1, 64), host.base_layer) is None
        model.train()
        out = model(**tiny_inputs()).logits
        out.float().pow(2).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in modapt.trainable_parameters(model).values())
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # the direct path's formula, on one layer: pre y = T·(W0 x), post y = W0·(T x), T = s·Iπ(BA)
    host = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    t = host.update.t_minus_i_matrix() + torch.eye(64)
    with torch.no_grad():
        want = host.base_layer(x) @ t.t() if side == "pre" else host.base_layer(x @ t.t())
        got = host(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("kind", ["bnb-int8", "bnb-nf4"])
def test_adapter_tensors_are_floating_whatever_the_base_stores(kind):
    """The issue's first two failures: an 8-bit base gave int8 adapter tensors (no gradients), a
    4-bit one read its packed [n, 1] tensor as the layer's shape. Even with the autocast rule
    off, the adapter takes the layer's compute dtype (float32 here), and the shapes the module's."""
    model = modapt.apply(quantized_tiny_llama(kind), recipe("lora"), autocast_adapter_dtype=False)
    host = model.model.layers[0].mlp.down_proj
    assert host.lora_A.weight.shape == (4, 96) and host.lora_B.weight.shape == (64, 4)
    assert {p.dtype for p in modapt.trainable_parameters(model).values()} == {torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao 0.18's int4 weight-only kernels need CUDA")
@pytest.mark.parametrize("method", ["lora", "dora", "lomap"])
def test_torchao_int4_on_the_gpu(method, tmp_path):
    """torchao int4 (tile_packed_to_4d, bf16): the formula within bf16 rounding, gradients, save/load.
    Written without a GPU at hand (none was lent when it was added): run it where there is one."""
    model = modapt.apply(quantized_tiny_llama("torchao-int4"), recipe(method))
    randomize(model)
    host = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)).to("cuda", torch.bfloat16)
    with torch.no_grad():  # W0 x by the int4 layer itself, in bf16; the adapter's terms in float32
        got = host(x).float()
        base_out = host.base_layer(x).float()
    w0 = host.base_layer.weight.dequantize().float()
    s = 2.0
    with torch.no_grad():
        a, b = host.lora_A.weight.float(), host.lora_B.weight.float()
        delta_x = s * (x.float() @ a.t()) @ b.t()
    if method == "lora":
        want = base_out + delta_x
    elif method == "dora":
        want = (host.lora_magnitude_vector / torch.linalg.vector_norm(w0 + s * b @ a, dim=1)) * (base_out + delta_x)
    else:
        want = (host.map_alpha / torch.linalg.vector_norm(w0)) * base_out \
            + (host.map_beta / torch.linalg.vector_norm(s * b @ a)) * delta_x
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # the output is rounded to bf16
    inputs = {k: v.cuda() for k, v in tiny_inputs().items()}
    model.train()
    model(**inputs).logits.float().pow(2).mean().backward()
    trainable = modapt.trainable_parameters(model)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    model.eval()
    modapt.save(model, tmp_path / "adapter")
    fresh = modapt.load(quantized_tiny_llama("torchao-int4"), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), rtol=0, atol=0)


def test_cli_merge_of_a_4bit_adapter_into_the_float_folder(tmp_path, capsys):
    """The adapter trained on the 4-bit form of a float folder: refused with the way out named,
    merged with --no-verify-base (in the folder's dtype, by the streaming merge)."""
    from modapt.cli import main
    from modapt.testing.quantized_models import _float_folder
    from transformers import AutoModelForCausalLM

    model = modapt.apply(quantized_tiny_llama("bnb-nf4"), recipe("lora"))
    randomize(model)
    modapt.save(model, tmp_path / "adapter")
    args = ["merge", "--base", _float_folder(0), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "is not quantized (float32)" in err and "--no-verify-base" in err and "corrupted" not in err
    assert main([*args, "--no-verify-base"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    host = model.model.layers[0].self_attn.q_proj
    float_w0 = AutoModelForCausalLM.from_pretrained(_float_folder(0)).model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        want = float_w0 + 2.0 * host.lora_B.weight @ host.lora_A.weight  # W0 of the float folder + s·B A
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, want, rtol=1e-5, atol=1e-6)
