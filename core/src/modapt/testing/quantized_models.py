"""Tiny quantized LLaMA bases for tests: the float tiny LLaMA, quantized as a user would.

bitsandbytes kinds go through transformers (``save_pretrained`` of the float model into a
temporary folder, then ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
on the CPU: bitsandbytes ≥ 0.48 has a CPU backend), torchao through ``quantize_``. Two calls
with the same seed give the same quantized weights (quantization is deterministic), which is
the "freshly quantized base" of a save/load test.
"""

from __future__ import annotations

import functools
import tempfile
import warnings

import torch

from .models import tiny_llama

#: name -> what it is; the quantized family of the conformance suite runs over these
QUANTIZED_BASES = {
    "bnb-nf4": "bitsandbytes 4-bit nf4 with double quantization, float32 compute",
    "bnb-fp4": "bitsandbytes 4-bit fp4, no double quantization, float32 compute",
    "bnb-int8": "bitsandbytes 8-bit (LLM.int8)",
    "torchao-int8": "torchao Int8WeightOnlyConfig",
}
#: bases that need a CUDA GPU (torchao 0.18's int4 kernels: "plain" needs the mslk package,
#: "plain_int32" has no CPU path, "tile_packed_to_4d" is CUDA-only and bf16-only)
GPU_QUANTIZED_BASES = {
    "torchao-int4": "torchao Int4WeightOnlyConfig(group_size=32, tile_packed_to_4d), bf16, on CUDA",
}


def available(name: str) -> str | None:
    """``None`` when the base ``name`` can be built here, else the reason (a missing package)."""
    if name in GPU_QUANTIZED_BASES and not torch.cuda.is_available():
        return f"{name} needs a CUDA GPU ({GPU_QUANTIZED_BASES[name]})"
    package = "torchao" if name.startswith("torchao") else "bitsandbytes"
    try:
        __import__(package)
    except ImportError:
        return f"{package} is not installed (pip install 'modapt[quantized]')"
    return None


@functools.lru_cache(maxsize=4)
def _float_folder(seed: int) -> str:
    # one folder per process and seed; the OS removes it with the temporary directory
    folder = tempfile.mkdtemp(prefix="modapt-tiny-llama-")
    tiny_llama(seed=seed).save_pretrained(folder)
    return folder


def quantized_tiny_llama(name: str, seed: int = 0):
    """The tiny LLaMA (:func:`modapt.testing.models.tiny_llama`) with its decoder linear layers
    quantized as ``name`` (a key of :data:`QUANTIZED_BASES`) says; ``lm_head`` stays float (as
    transformers' bitsandbytes loading keeps it). eval mode, on the CPU (``torchao-int4``: bf16
    on the GPU, see :data:`GPU_QUANTIZED_BASES`)."""
    if name.startswith("bnb"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if name == "bnb-int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name.removeprefix("bnb-"),
                                        bnb_4bit_use_double_quant=name == "bnb-nf4",
                                        bnb_4bit_compute_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(_float_folder(seed), quantization_config=config,
                                                         device_map="cpu", dtype=torch.float32)
    elif name == "torchao-int4":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        model = tiny_llama(seed=seed).to("cuda", torch.bfloat16)
        quantize_(model, Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d"),
                  filter_fn=lambda m, path: isinstance(m, torch.nn.Linear) and not path.endswith("lm_head"))
    elif name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = tiny_llama(seed=seed)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, path: isinstance(m, torch.nn.Linear)
                  and not path.endswith("lm_head"))
    else:
        raise KeyError(f"unknown quantized base '{name}'; known: {', '.join(QUANTIZED_BASES)}")
    from ..quantized import keep_stored_format

    for module in model.modules():  # unadapted layers too: the same function before and after an eval pass
        keep_stored_format(module)
    model.eval()
    return model
