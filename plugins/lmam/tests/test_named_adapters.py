"""LMAM as a named adapter beside a LoRA (issue 36): switch, disable, rows, save one
(:func:`modapt.testing.conformance.check_named_beside_lora`)."""

import pytest
from modapt.testing.conformance import check_named_beside_lora


@pytest.mark.parametrize("entry", [
    {"method": "lmam", "n": 6, "r": 2, "init": "random"},
    {"method": "lmam", "n": 6, "r": 2, "align": "tail", "nonnegative": "softmax", "heads": 1},
], ids=["head", "tail-softmax"])
def test_lmam_beside_lora(registry, tmp_path, entry):
    check_named_beside_lora(entry, registry, tmp_path)
