"""What an exported graph takes and returns, per task: wrapper modules, names, sample inputs.

The exporter traces a small wrapper around the transformers model so that the graph's inputs and
outputs are plain tensors with fixed names:

- ``sequence-classification``: ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, seq]
  int64 -> ``logits`` [batch, num_labels].
- ``feature-extraction``: same inputs -> ``last_hidden_state`` [batch, seq, hidden].
- ``causal-lm`` (the ONNX Runtime GenAI / Optimum layout): ``input_ids`` [batch, seq],
  ``attention_mask`` [batch, past + seq], ``position_ids`` [batch, seq], then per layer i
  ``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past, head_dim] -> ``logits``
  [batch, seq, vocab], then ``present.{i}.key`` / ``.value`` [batch, kv_heads, past + seq, head_dim].
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

import modapt

TASKS = ("sequence-classification", "causal-lm", "feature-extraction")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise modapt.ModaptError(f"unknown export task '{task}'; accepted: {', '.join(TASKS)}")
    return task


@dataclass(frozen=True)
class CacheGeometry:
    """Shape of one layer's key/value cache: [batch, kv_heads, length, head_dim]."""

    num_layers: int
    kv_heads: int
    head_dim: int


def cache_geometry(config) -> CacheGeometry:
    """Read layers, key/value heads and head size from a transformers config (LLaMA, GPT-2, ...)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return CacheGeometry(text.num_hidden_layers, kv_heads, head_dim)


def _no_cache_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` where the model takes it: decoder models otherwise return a
    DynamicCache, which the exporter cannot emit as an output."""
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params or getattr(model.config, "use_cache", None) else {}


class EncoderWrapper(nn.Module):
    """``(input_ids, attention_mask)`` -> one tensor (``logits`` or ``last_hidden_state``)."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output
        self.kwargs = _no_cache_kwargs(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self.kwargs)
        return getattr(out, self.output)


def cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache: ``cache`` (transformers ≥ 5.25)
    or the deprecated ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class CausalLMWithCache(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past)`` -> ``(logits, *present)``.

    ``past`` is the flat list key_0, value_0, key_1, value_1, ... each [batch, kv_heads, past,
    head_dim]; a past of length 0 is the first step. A ``DynamicCache`` is rebuilt from it inside
    the traced function, so the graph carries no Python cache object.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = cache_geometry(model.config).num_layers
        self.cache_arg = cache_argument(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        # transformers >= 5.25 names the cache ``cache`` and warns on ``past_key_values`` (removed in
        # 5.40); older releases only know ``past_key_values``: pick by the signature, not by version
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache})
        returned = out["cache"] if self.cache_arg == "cache" else out["past_key_values"]
        present = []
        for layer in returned.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def wrap(model: nn.Module, task: str) -> nn.Module:
    if task == "causal-lm":
        return CausalLMWithCache(model)
    return EncoderWrapper(model, "logits" if task == "sequence-classification" else "last_hidden_state")


def io_names(task: str, config) -> tuple[list[str], list[str]]:
    """(input names, output names) of the graph, in order."""
    if task == "causal-lm":
        n = cache_geometry(config).num_layers
        past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]
    out = "logits" if task == "sequence-classification" else "last_hidden_state"
    return ["input_ids", "attention_mask"], [out]


def dynamic_shapes(task: str, config) -> tuple:
    """``dynamic_shapes`` for ``torch.onnx.export``, one entry per positional parameter.

    The attention mask of the causal LM gets its own ``total_len``: torch.export refuses
    ``past_len + seq`` as a derived dimension of a separate input.
    """
    Dim = torch.export.Dim
    batch, seq = Dim("batch"), Dim("seq")
    if task != "causal-lm":
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
    past, total = Dim("past_len", min=0), Dim("total_len")
    n = cache_geometry(config).num_layers
    # ``*past`` is one positional entry (a tuple) for torch.export
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
            tuple({0: batch, 2: past} for _ in range(2 * n)))


def position_ids_from_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Positions of the last ``seq`` tokens: running count of real tokens − 1, 0 on padding
    (what ``generate`` computes for left-padded batches). [batch, total] -> [batch, seq]."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos[:, -seq:]


def make_inputs(task: str, config, batch: int, seq: int, past: int = 0, padding: str = "right",
                seed: int = 0, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random inputs named as the graph names them.

    ``padding``: ``"none"``, ``"right"`` or ``"left"``; with batch ≥ 2 the first row is padded
    (by a third of its total length, at least 1 token), the others are full. Causal-LM past
    tensors are random normal [batch, kv_heads, past, head_dim] in ``dtype``.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    total = past + seq
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, total, dtype=torch.long)
    if padding != "none" and batch >= 2:
        n_pad = max(1, total // 3)
        if task == "causal-lm":
            n_pad = min(n_pad, total - 1)  # causal LMs pad on the left; keep one real token
            mask[0, :n_pad] = 0
        elif padding == "left":
            mask[0, :n_pad] = 0
        else:
            mask[0, total - n_pad:] = 0
    pad_id = getattr(config, "pad_token_id", None) or 0
    ids = ids.masked_fill(mask[:, past:] == 0, pad_id)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if task == "causal-lm":
        feeds["position_ids"] = position_ids_from_mask(mask, seq)
        geo = cache_geometry(config)
        for i in range(geo.num_layers):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = torch.randn(
                    batch, geo.kv_heads, past, geo.head_dim, generator=gen).to(dtype)
    if device is not None:
        feeds = {k: v.to(device) for k, v in feeds.items()}
    return feeds
