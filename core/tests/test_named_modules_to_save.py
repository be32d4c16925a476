"""modules_to_save of a further named adapter (issue 36): a trainable copy of the base module,
routed per adapter and per row, against models holding each adapter alone and the bare base."""

import pytest
import torch

import modapt
import modapt.lora
from modapt.registry import Registry, use_registry
from modapt.testing.conformance import model_output, perturb
from modapt.testing.models import tiny_bert, tiny_inputs

QV = {"adapter": [{"method": "lora", "targets": ["query", "value"], "r": 4}]}
CLS = {"adapter": [{"method": "lora", "targets": ["key"], "r": 4}], "modules_to_save": ["classifier"]}


@pytest.fixture(scope="module")
def registry():
    registry = Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    with use_registry(registry):
        yield registry


def test_modules_to_save_copy_beside_a_first_adapter(registry, tmp_path):
    singles = {}
    for seed, (name, recipe) in enumerate((("qv", QV), ("cls", CLS), ("cls2", CLS)), start=1):
        singles[name] = modapt.apply(tiny_bert().eval(), recipe, registry=registry)
        perturb(singles[name], seed=seed)  # the classifier too: it is trained in full
        modapt.save(singles[name], tmp_path / name, registry=registry)
    base, multi = tiny_bert().eval(), tiny_bert().eval()
    for name in singles:
        modapt.load(multi, tmp_path / name, name=name, registry=registry)
    assert {"classifier.modapt_adapters.cls.weight", "classifier.modapt_adapters.cls2.weight"} <= \
        dict(multi.named_parameters()).keys()
    assert torch.equal(multi.classifier.weight, base.classifier.weight), "the base classifier must stay untouched"
    inputs = tiny_inputs(batch=3)
    with torch.no_grad():
        outs = {name: model_output(single, inputs) for name, single in singles.items()}
        for name in singles:
            modapt.set_active(multi, name)
            torch.testing.assert_close(model_output(multi, inputs), outs[name], atol=1e-5, rtol=0)
            trainable = modapt.trainable_parameters(multi)
            assert sum(p.numel() for p in trainable.values()) == \
                sum(p.numel() for p in modapt.trainable_parameters(singles[name]).values())
        assert not multi.classifier.weight.requires_grad
        with pytest.raises(modapt.StateError, match="'classifier': adapters 'cls' and 'cls2' both hold"):
            modapt.set_active(multi, ["cls", "cls2"])
        with modapt.disabled(multi):
            assert torch.equal(model_output(multi, inputs), model_output(base, inputs))
        names = ["cls", None, "cls2"]
        with modapt.rows(multi, names):
            mixed = model_output(multi, inputs)
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], model_output(singles[name] if name else base, inputs)[i],
                                       atol=1e-5, rtol=0)
    modapt.save(multi, tmp_path / "saved", name="cls2", registry=registry)
    alone = modapt.load(tiny_bert().eval(), tmp_path / "saved", registry=registry)
    expected, loaded = modapt.adapter_state_dict(singles["cls2"]), modapt.adapter_state_dict(alone)
    assert expected.keys() == loaded.keys() and all(torch.equal(expected[k], loaded[k]) for k in expected)
    modapt.delete(multi, "cls")
    assert "classifier.modapt_adapters.cls.weight" not in dict(multi.named_parameters())
    modapt.remove(multi)
    assert multi.state_dict().keys() == base.state_dict().keys() and "forward" not in multi.classifier.__dict__
    with pytest.raises(modapt.StateError, match="trains modules_to_save in place"):  # the first adapter's
        first = modapt.load(tiny_bert().eval(), tmp_path / "cls", name="cls", registry=registry)
        modapt.load(first, tmp_path / "qv", name="qv", registry=registry)
