"""Quantized linear layers as layer kinds: W0·x from the layer itself, W0 as float by dequantizing.

A quantized linear layer stores W0 [out, in] packed (bitsandbytes 4-bit: uint8 [out·in/2, 1]
plus absmax blocks; 8-bit: int8 [out, in] plus a scale per row; torchao: a tensor subclass
holding int data and scales). Adapters never read the packed tensor as if it were W0:

- dims come from the module (``out_features``, ``in_features``), never from the stored shape;
- W0·x + b is always the module's own call (its kernel, its activation handling: bitsandbytes
  8-bit quantizes x too), never a re-implemented quantized matmul;
- W0 as a float tensor [out, in] (MAP's ‖W0‖_F, DoRA's row norms, LoRMA's T·W0, merges) is the
  kind's ``dequantize``: a new tensor each call, which costs one dequantization of the layer
  (a read of the packed tensor and a write of out·in floats);
- adapter tensors are floating point: the layer's compute dtype, or float32 under the core's
  ``autocast_adapter_dtype`` rule (see :func:`modapt.apply.apply`).

A kind is a :class:`QuantizedKind` in a registry (:func:`register_kind`); a layer whose weight is
not a plain floating tensor and that no kind covers is refused at ``apply`` naming its path, its
class and the kinds supported (:func:`unsupported`). bitsandbytes and torchao are optional
(extra ``modapt[quantized]``): a kind is recognised only if its package was already imported,
which it must be for such a layer to exist, so this module imports neither.

The fingerprint of a quantized layer (:func:`stored_tensors`) is over what the layer stores in
its state dict for the weight, as transformers saves it: bitsandbytes 4-bit ``weight`` (packed
uint8), ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map`` and ``weight.quant_state.bitsandbytes__<nf4|fp4>`` (the JSON of
quant type, block sizes, original dtype and shape); bitsandbytes 8-bit ``weight`` (int8),
``SCB`` (the row scales) and ``weight_format``; torchao the inner tensors of the weight's
subclass (``weight.qdata``, ``weight.scale``, ``weight.zero_point`` for ``Int8Tensor``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModaptError

EXTRA = "modapt[quantized]"


class QuantizedError(ModaptError):
    """A quantized layer or a quantization option that modapt cannot handle."""


@dataclass(frozen=True)
class QuantizedKind:
    """How modapt handles one family of quantized linear layers.

    matches(module): True for a layer of this kind (must not import anything).
    dequantize(module): W0 [out, in] as a floating tensor (the layer's original/compute dtype).
    compute_dtype(module): the floating dtype the layer computes in (adapter dtype before the
        autocast rule).
    stored(module): {name relative to the module: tensor} of what the layer stores for its
        weight (the fingerprint's input), bias excluded.
    keep_stored_format(module): called when an adapter is put on the layer; turns off any
        in-place rewrite of the stored weight the layer would do by itself (see bitsandbytes
        4-bit below). Default: nothing.
    """

    name: str
    description: str
    matches: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]
    compute_dtype: Callable[[nn.Module], torch.dtype]
    stored: Callable[[nn.Module], dict[str, torch.Tensor]]
    keep_stored_format: Callable[[nn.Module], None] = lambda module: None


_KINDS: dict[str, QuantizedKind] = {}


def register_kind(kind: QuantizedKind) -> None:
    """Add a quantized layer kind (an out-of-tree GPTQ/AWQ kind registers itself here)."""
    if kind.name in _KINDS:
        raise QuantizedError(f"quantized layer kind '{kind.name}' is already registered")
    _KINDS[kind.name] = kind


def kinds() -> list[str]:
    """Names of the registered quantized kinds."""
    return sorted(_KINDS)


def kind_of(module: nn.Module) -> QuantizedKind | None:
    """The quantized kind of ``module``, or ``None`` for a plain (or unsupported) layer."""
    for kind in _KINDS.values():
        if kind.matches(module):
            return kind
    return None


def is_plain_tensor(weight: torch.Tensor) -> bool:
    """True when ``weight`` is an ordinary floating tensor a matmul may use as W0 directly.

    Decided from the weight, not the module: a ``Tensor``/``Parameter`` of a floating dtype, or
    a DTensor (FSDP2 shards, gathered before use). bitsandbytes' packed integer parameters and
    torchao's tensor subclasses (which report a floating dtype) are not.
    """
    if not weight.is_floating_point():
        return False
    if type(weight) in (torch.Tensor, nn.Parameter):
        return True
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(weight, dtensor)


def unsupported(module: nn.Module) -> str | None:
    """Why ``module`` is a quantized layer modapt cannot adapt, or ``None``.

    A layer is quantized when its weight is not a plain floating tensor or it stores a packed
    ``qweight`` (GPTQ/AWQ ``QuantLinear``); such a layer needs a registered kind.
    """
    if kind_of(module) is not None:
        return None
    weight = getattr(module, "weight", None)
    packed = isinstance(getattr(module, "qweight", None), torch.Tensor)
    if packed or (isinstance(weight, torch.Tensor) and not is_plain_tensor(weight)):
        what = type(weight).__name__ if not packed else "packed qweight"
        return (f"a quantized {type(module).__module__}.{type(module).__name__} ({what}) that no layer kind "
                f"covers; supported quantized kinds: {', '.join(kinds())}")
    return None


def dequantize(module: nn.Module) -> torch.Tensor:
    """W0 [out, in] of a quantized layer as a new floating tensor (no grad)."""
    kind = kind_of(module)
    if kind is None:
        raise QuantizedError(f"{type(module).__name__} is not a quantized layer of a known kind")
    with torch.no_grad():
        return kind.dequantize(module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in (float32 when it does not say)."""
    kind = kind_of(module)
    return kind.compute_dtype(module) if kind is not None else torch.float32


def keep_stored_format(module: nn.Module) -> None:
    """Stop a quantized layer from rewriting its stored weight by itself (see the kinds)."""
    kind = kind_of(module)
    if kind is not None:
        kind.keep_stored_format(module)


def stored_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name relative to the layer: tensor} of what a quantized layer stores for its weight."""
    return kind_of(module).stored(module)


def _state_without_bias(module: nn.Module) -> dict[str, torch.Tensor]:
    # the layer's own serialisation (bitsandbytes writes its quant state there): the same
    # tensors transformers writes to a checkpoint, so live and on-disk fingerprints agree
    return {k: v for k, v in module.state_dict(keep_vars=True).items()
            if k != "bias" and isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------- bitsandbytes 4-bit
def _bnb():
    return sys.modules.get("bitsandbytes")


def _bnb4_matches(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _bnb4_dequantize(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:  # not quantized yet (before .to(device)): the float weight itself
        return weight.detach().clone()
    return _bnb().functional.dequantize_4bit(weight.data, state)


def _bnb4_compute_dtype(module: nn.Module) -> torch.dtype:
    if module.compute_dtype is not None:
        return module.compute_dtype
    state = getattr(module.weight, "quant_state", None)
    return state.dtype if state is not None else torch.float32


def _bnb4_keep_format(module: nn.Module) -> None:
    # On a CPU with AVX512-bf16, bitsandbytes 0.50 repacks a Linear4bit's weight in place at its
    # first eval forward without grad (nibbles re-ordered, absmax rounded to bf16 and un-nested)
    # and packs it back, lossily, on save: the stored bytes, hence the fingerprint and W0
    # itself, would change under inference; it also fails for in_features not a multiple of
    # the block size (LLaMA's 96-wide test MLP). Adapted layers keep the stored format.
    state = getattr(module.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        module.state_dict()  # bitsandbytes' own save path undoes the repacking
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


register_kind(QuantizedKind(
    "bitsandbytes-4bit", "bitsandbytes Linear4bit (nf4 or fp4, with or without double quantization)",
    _bnb4_matches, _bnb4_dequantize, _bnb4_compute_dtype, _state_without_bias, _bnb4_keep_format))


# ---------------------------------------------------------------------- bitsandbytes 8-bit
def _bnb8_matches(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def _bnb8_scales(module: nn.Module) -> torch.Tensor | None:
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return scb


def _bnb8_dequantize(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if weight.dtype != torch.int8:  # has_fp16_weights: still a float weight
        return weight.detach().clone()
    # LLM.int8 row-wise absmax quantization: W0[i] = CB[i] · SCB[i] / 127
    return weight.data.float() * (_bnb8_scales(module).float().unsqueeze(1) / 127.0)


def _bnb8_compute_dtype(module: nn.Module) -> torch.dtype:
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32


def _bnb8_stored(module: nn.Module) -> dict[str, torch.Tensor]:
    out = _state_without_bias(module)
    if "SCB" not in out and _bnb8_scales(module) is not None:
        out["SCB"] = _bnb8_scales(module)
    return out


register_kind(QuantizedKind(
    "bitsandbytes-8bit", "bitsandbytes Linear8bitLt (LLM.int8, int8 weights with row scales)",
    _bnb8_matches, _bnb8_dequantize, _bnb8_compute_dtype, _bnb8_stored))


# ---------------------------------------------------------------------- torchao
def _torchao_weight(module: nn.Module):
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None)
    weight = getattr(module, "weight", None)
    if base is None or not isinstance(module, nn.Linear) or not isinstance(weight, base):
        return None
    return weight if hasattr(weight, "dequantize") else None


def _torchao_dequantize(module: nn.Module) -> torch.Tensor:
    return _torchao_weight(module).dequantize()


def _torchao_stored(module: nn.Module) -> dict[str, torch.Tensor]:
    weight = _torchao_weight(module)
    names, _ = weight.__tensor_flatten__()
    return {f"weight.{n}": getattr(weight, n) for n in names if isinstance(getattr(weight, n, None), torch.Tensor)}


register_kind(QuantizedKind(
    "torchao", "torchao tensor-subclass weights on nn.Linear (Int8WeightOnlyConfig; int4 where the CPU/GPU has it)",
    lambda m: _torchao_weight(m) is not None, _torchao_dequantize, lambda m: m.weight.dtype, _torchao_stored))


# ---------------------------------------------------------------------- loading and training
QUANTIZE_CHOICES = ("4bit", "8bit")


def bnb_config(quantize: str, compute_dtype: torch.dtype = torch.float32):
    """The transformers ``BitsAndBytesConfig`` of ``--quantize`` (``4bit``: nf4, double quant)."""
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; say which extra gives it)
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise QuantizedError(f"--quantize {quantize} needs bitsandbytes: pip install '{EXTRA}'") from None
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise QuantizedError(f"--quantize: '{quantize}' is not one of {', '.join(QUANTIZE_CHOICES)}")


def load_kwargs(quantize: str, compute_dtype: torch.dtype | None = None) -> dict:
    """``from_pretrained`` keyword arguments that load a model quantized as ``--quantize`` says.

    ``compute_dtype``: default bfloat16 on a GPU that supports it, else float32 (the CPU);
    the model's other weights (norms, embeddings, head) load in it too. The device map puts
    the model on the GPU when there is one (``LOCAL_RANK``'s under torchrun), else the CPU.
    """
    if compute_dtype is None:
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        compute_dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    # one whole copy per process: under torchrun each rank loads onto its own GPU
    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else "cpu"
    return {"quantization_config": bnb_config(quantize, compute_dtype), "device_map": device_map,
            "dtype": compute_dtype}


def load_quantized(name_or_path: str, quantize: str, *, compute_dtype: torch.dtype | None = None,
                   device_map: str | dict | None = None, model_class=None):
    """A transformers model loaded with its linear layers quantized by bitsandbytes.

    ``quantize``: ``"4bit"`` (nf4, double quantization, ``compute_dtype``) or ``"8bit"``;
    see :func:`load_kwargs` for the defaults (bitsandbytes ≥ 0.48 runs on the GPU and the CPU).
    The result is not yet prepared for training: see :func:`prepare_for_kbit_training`.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    kwargs = load_kwargs(quantize, compute_dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    return model_class.from_pretrained(name_or_path, **kwargs)


def prepare_for_kbit_training(model: nn.Module, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Make a quantized model trainable the way PEFT's ``prepare_model_for_kbit_training`` does.

    Call before :func:`modapt.apply`. What it does (and only this):
    - freezes every base parameter;
    - casts every floating parameter that is not quantized and not float32 (norms, embeddings,
      the output head) to float32, for stable training where the base is fp16/bf16;
    - with ``gradient_checkpointing``: enables it (non-reentrant) and makes the input embeddings'
      output require grad, so that checkpointed blocks see an input with a grad and the
      adapters inside them receive gradients although the embeddings are frozen.
    - keeps every quantized layer's stored format (:func:`keep_stored_format`: no in-place
      CPU repacking by bitsandbytes at evaluation, which would change the fingerprinted bytes
      and fails for widths that are not a multiple of the block size).
    Returns the same model.
    """
    quantized_params = set()
    for module in model.modules():
        if kind_of(module) is not None:
            keep_stored_format(module)
            quantized_params.update(id(p) for p in module.parameters(recurse=False))
    for param in model.parameters():
        param.requires_grad_(False)
        if id(param) in quantized_params or not is_plain_tensor(param):
            continue
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear layer by a plain ``nn.Linear`` holding W0 in ``dtype``
    (default: the layer's compute dtype; when given, every other floating tensor is cast to it
    too) and drop the quantization from the model's config,
    so that ``save_pretrained`` writes a checkpoint plain transformers loads. Same model returned.
    """
    for path, module in list(model.named_modules()):
        kind = kind_of(module)
        if kind is None or not path:
            continue
        plain = plain_linear(module, dtype)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, plain)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in model.__dict__:
            model.__dict__[attr] = False
    model.__dict__.pop("quantization_method", None)
    quantizer = model.__dict__.get("hf_quantizer")
    conversions = model.__dict__.get("_weight_conversions")
    if quantizer is not None and conversions:
        # transformers 5 re-applies the load-time conversions in reverse on save; the quantizer's
        # own (packed-state deserialisation) have nothing left to act on
        model.__dict__["_weight_conversions"] = [
            c for c in conversions if not any(getattr(op, "hf_quantizer", None) is quantizer
                                              for op in getattr(c, "operations", []))]
    if "hf_quantizer" in model.__dict__:
        model.__dict__["hf_quantizer"] = None
    if dtype is not None:  # nothing quantized is left: every floating tensor (merged layers, norms) in dtype
        nn.Module.to(model, dtype)  # transformers' own .to refuses any dtype on a model loaded by bitsandbytes
        if config is not None:
            config.dtype = dtype
    return model


class DequantizedLinear(nn.Linear):
    """An ``nn.Linear`` holding a dequantized (or merged) weight in place of a quantized layer,
    called the way the quantized layer was: x [..., in] is cast to the weight's dtype and the
    output [..., out] back to x's dtype. A quantized layer computes in its compute dtype and
    returns the input's dtype, so the model around it may run in another dtype (float32 norms
    after :func:`prepare_for_kbit_training` around bf16 layers); a bare ``nn.Linear`` would
    fail there. Its state dict is an ``nn.Linear``'s (``weight``, ``bias``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        return super().forward(x.to(dtype)).to(x.dtype)


def plain_linear(module: nn.Module, dtype: torch.dtype | None = None,
                 weight: torch.Tensor | None = None) -> nn.Linear:
    """A frozen :class:`DequantizedLinear` computing like ``module`` with ``weight`` [out, in]
    (default: W0 dequantized), in ``dtype`` (default: the layer's compute dtype)."""
    dtype = dtype or compute_dtype(module)
    weight = dequantize(module) if weight is None else weight
    bias = getattr(module, "bias", None)
    plain = DequantizedLinear(module.in_features, module.out_features, bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.detach().to(dtype).contiguous(), requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    plain.train(module.training)
    return plain
