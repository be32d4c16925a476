"""Greedy generation through an exported causal-lm graph, with its key/value cache.

The loop mirrors ``transformers`` ``generate(do_sample=False)``: a prefill over the (left-padded)
prompt with an empty past, then one token per step feeding ``present.*`` back as
``past_key_values.*``; positions are the running count of real tokens − 1; a row that produced
the end-of-sequence token is continued with the pad token, and the loop stops when every row has.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

import modapt

from .onnx_io import position_ids_from_mask
from .ort_model import OrtModel


def _eos_set(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def greedy_generate(model: OrtModel | str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 20, eos_token_id: int | Iterable[int] | None = None,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with the cache.

    :param model: an :class:`OrtModel` over a causal-lm export (or its directory).
    :param input_ids: [batch, prompt] int64, left-padded when rows differ in length.
    :param attention_mask: [batch, prompt], 0 on padding (default: all ones).
    :param eos_token_id: one id or several (``generate`` reads it from ``generation_config``; here
        it is explicit); ``None`` generates exactly ``max_new_tokens``.
    :param pad_token_id: written after a row finished (default ``eos_token_id`` or 0).
    :return: [batch, prompt + new] int64 on ``input_ids``' device: the prompt then the new tokens.
    """
    if not isinstance(model, OrtModel):
        model = OrtModel(model)
    if "position_ids" not in model.input_names or "past_key_values.0.key" not in model.input_names:
        raise modapt.ModaptError(f"{model.path} is not a causal-lm export with a cache (inputs: {model.input_names})")
    out_device = input_ids.device
    device = torch.device("cuda") if model.on_cuda else torch.device("cpu")
    ids = input_ids.to(device=device, dtype=torch.long)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    eos = _eos_set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    cache = _empty_past(model, ids.shape[0], device)
    batch = ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    tokens, step_ids = [ids], ids
    for _ in range(max_new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": mask,
                 "position_ids": position_ids_from_mask(mask, step_ids.shape[1]), **cache}
        out = model.run_torch(feeds)
        next_tokens = out["logits"][:, -1, :].argmax(-1).to(torch.long)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
        tokens.append(next_tokens[:, None])
        if eos:
            unfinished &= ~torch.isin(next_tokens, torch.tensor(eos, device=device))
        if not unfinished.any():
            break
        cache = {name.replace("present.", "past_key_values.", 1): out[name]
                 for name in model.output_names if name.startswith("present.")}
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        step_ids = next_tokens[:, None]
    return torch.cat(tokens, dim=1).to(out_device)


def _empty_past(model: OrtModel, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Past of length 0 for every layer, in the graph's float dtype."""
    cache = model.manifest.get("cache")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(model.manifest.get("dtype"), torch.float32)
    past = {}
    for inp in model.session.get_inputs():
        if inp.name.startswith("past_key_values."):
            kv_heads, head_dim = (cache["kv_heads"], cache["head_dim"]) if cache else (inp.shape[1], inp.shape[3])
            past[inp.name] = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
    return past

