"""The placements against AdapterHub's bottleneck arithmetic (``adapters`` 1.3.0), written out.

AdapterHub computes, for a sub-block output f, its residual stream r (``input_tensor``) and the
block's post-LN norm LN (``None`` in pre-LN blocks: then LN(z) = z), in eval mode:

- ``Adapter`` (Houlsby = DoubleSeqBn: original_ln_before False, residual_before_ln True):
  out = LN(f + s·A(f) + r)
- ``Adapter`` (Pfeiffer = SeqBn: original_ln_before True): x = LN(f + r); out = LN(f + s·A(x) + r)
- ``ParallelAdapter`` (ParBn): out = LN(f + s·A(r) + r)

with A(x) = W_up act(W_down x + b_down) + b_up. Here f, r and the stream after the sub-block are
captured from the adapted model (f recomputed by calling the output module's ``forward``, which
skips the hooks), and the formula is evaluated with the adapter's weights.
"""

import modapt
import modapt_bottleneck.plugin
import pytest
import torch
import torch.nn.functional as F
from modapt.testing import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
#: AdapterHub's configs by name, as modapt recipes
CONFIGS = {
    "houlsby": ({"placement": "series", "activation": "swish", "reduction_factor": 16}, "houlsby", ("attn", "ffn")),
    "pfeiffer": ({"placement": "pfeiffer", "activation": "relu", "reduction_factor": 16}, "pfeiffer", ("ffn",)),
    "parbn": ({"placement": "ffn", "input": "residual", "activation": "relu", "reduction_factor": 2, "scale": 4.0},
              "parallel", ("ffn",)),
    "parallel": ({"placement": "parallel", "input": "residual", "activation": "relu", "reduction_factor": 2,
                  "scale": 4.0},
                 "parallel", ("attn", "ffn")),
}


@pytest.fixture
def registry(modapt_registry):
    modapt_registry.register_plugin(modapt_bottleneck.plugin, name="bottleneck", distribution="modapt-bottleneck")
    return modapt_registry


def _modules(arch, block, site):
    """(module whose first input is r, output module giving f, module whose output is the stream after, LN)."""
    if arch == "llama":
        return {"attn": (block.input_layernorm, block.self_attn, ("in", block.post_attention_layernorm), None),
                "ffn": (block.post_attention_layernorm, block.mlp, ("out", block), None)}[site]
    if arch == "gpt2":
        return {"attn": (block.ln_1, block.attn, ("in", block.ln_2), None),
                "ffn": (block.ln_2, block.mlp, ("out", block), None)}[site]
    return {"attn": (block.attention, block.attention.output.dense, ("out", block.attention.output),
                     block.attention.output.LayerNorm),
            "ffn": (block.intermediate, block.output.dense, ("out", block.output), block.output.LayerNorm)}[site]


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _a(adapter, x, act):
    return F.linear(act(F.linear(x, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_placements_compute_adapterhubs_bottleneck(registry, arch, config):
    options, kind, sites = CONFIGS[config]
    model = FACTORIES[arch]()
    block_path = {"llama": "model.layers.0", "gpt2": "transformer.h.0", "bert": "bert.encoder.layer.0"}[arch]
    modapt.apply(model, {"adapter": [{"method": "bottleneck", "targets": [block_path], **options}]}, registry=registry)
    model.eval()
    block = model.get_submodule(block_path)
    d = model.config.hidden_size
    assert block.adapter_ffn.down.weight.shape[0] == d // options["reduction_factor"]
    assert {n for n in ("attn", "ffn") if hasattr(block, f"adapter_{n}")} == set(sites)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    act = torch.relu if options["activation"] == "relu" else F.silu
    scale = options.get("scale", 1.0)
    seen, handles = {}, []

    def keep(name, which):
        def hook(module, args, kwargs, output=None):
            if which == "in":
                seen[name] = args[0] if args else kwargs["hidden_states"]
            elif which == "call":
                seen[name] = (args, kwargs)
            else:
                seen[name] = _first(output)
        return hook

    for site in sites:
        res, out_mod, (where, after), _ = _modules(arch, block, site)
        handles.append(res.register_forward_pre_hook(keep(f"{site}.r", "in"), with_kwargs=True))
        handles.append(out_mod.register_forward_pre_hook(keep(f"{site}.call", "call"), with_kwargs=True))
        if where == "in":
            handles.append(after.register_forward_pre_hook(keep(f"{site}.after", "in"), with_kwargs=True))
        else:
            handles.append(after.register_forward_hook(
                lambda m, a, k, o, s=site: seen.__setitem__(f"{s}.after", _first(o)), with_kwargs=True))
    with torch.no_grad():
        # no KV cache: the attention is called a second time below, which must not see its own keys
        model(**tiny_inputs(), **({} if arch == "bert" else {"use_cache": False}))
        moved = 0.0
        for site in sites:
            _, out_mod, _, ln = _modules(arch, block, site)
            ln = ln or (lambda z: z)
            args, kwargs = seen[f"{site}.call"]
            f = _first(out_mod.forward(*args, **kwargs))      # the base sub-block output, no hooks
            r = seen[f"{site}.r"]
            adapter = getattr(block, f"adapter_{site}")
            if kind == "houlsby":
                want = ln(f + scale * _a(adapter, f, act) + r)
            elif kind == "pfeiffer":
                want = ln(f + scale * _a(adapter, ln(f + r), act) + r)
            else:
                want = ln(f + scale * _a(adapter, r, act) + r)
            got = seen[f"{site}.after"]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            moved = max(moved, (got - ln(f + r)).abs().max().item())
        assert moved > 1e-2  # the adapters act: the comparison can fail
    for h in handles:
        h.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sublayer_and_residual_inputs_differ_on_pre_ln_models(registry, arch):
    """The two readings of 'parallel' are different models on pre-LN blocks (they coincide on BERT)."""
    outs = []
    for inp in ("sublayer", "residual"):
        model = FACTORIES[arch]()
        modapt.apply(model, {"adapter": [{"method": "bottleneck", "placement": "ffn", "r": 4, "input": inp}]},
                     registry=registry)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, p in sorted(modapt.trainable_parameters(model).items()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            outs.append(_first(model(**tiny_inputs()).logits))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_option_errors_name_the_cause(registry):
    for bad, match in [({"r": 4, "reduction_factor": 16}, "both given"),
                       ({"placement": "series", "input": "residual"}, "parallel and ffn placements")]:
        with pytest.raises(modapt.RecipeError, match=match):
            modapt.apply(tiny_llama(), {"adapter": [{"method": "bottleneck", **bad}]}, registry=registry)
