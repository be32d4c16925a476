"""Testing support for modapt and its plugins: tiny models and the conformance suite.

``modapt.testing`` is also a pytest plugin (entry point ``pytest11``), so its fixtures are
available in every test session where modapt is installed.
"""

from __future__ import annotations

from .models import MODEL_FACTORIES, LayerHolder, tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama

__all__ = ["MODEL_FACTORIES", "LayerHolder", "tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_inputs"]
