"""The bottleneck adapter is part of the exported graph (capability ``exportable``): ONNX Runtime
on the exported model matches PyTorch with non-zero adapters. Slow (an export takes seconds)."""

import modapt
import modapt_bottleneck.plugin
import pytest
import torch
from modapt.testing import tiny_bert, tiny_inputs


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["series", "parallel", "ffn"])
def test_exported_graph_matches_pytorch(modapt_registry, tmp_path, placement):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    modapt_registry.register_plugin(modapt_bottleneck.plugin, name="bottleneck", distribution="modapt-bottleneck")
    model = modapt.apply(tiny_bert(), {"adapter": [{"method": "bottleneck", "placement": placement, "r": 4}]},
                         registry=modapt_registry)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(modapt.trainable_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (), str(path), kwargs=dict(inputs), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
    base = tiny_bert()(**inputs).logits.detach()
    assert (expected - base).abs().max() > 1e-3          # the adapter changes the output
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)
