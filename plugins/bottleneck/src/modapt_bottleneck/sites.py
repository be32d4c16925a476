"""Where a bottleneck adapter goes in a transformer block, per architecture.

A block has two sub-blocks ("sites"): ``attn`` and ``ffn``. Each site names the module
whose *input* a parallel adapter reads and the module whose *output* the adapter's branch is
added to (before the residual addition of the block):

| architecture | site | input module | output module |
| --- | --- | --- | --- |
| LLaMA-style (``self_attn`` + ``mlp``) | attn | ``self_attn`` | ``self_attn`` (element 0) |
|   | ffn | ``mlp`` | ``mlp`` |
| GPT-2 (``attn`` + ``mlp``) | attn | ``attn`` | ``attn`` (element 0) |
|   | ffn | ``mlp`` | ``mlp`` |
| BERT (``attention`` + ``intermediate`` + ``output``) | attn | ``attention`` | ``attention.output.dense`` |
|   | ffn | ``intermediate`` | ``output.dense`` |

Each site also names the module whose first input is the sub-block's *residual stream* (what
the block adds the sub-block's output to: AdapterHub's ``input_tensor``) and, in post-LN
blocks, the LayerNorm applied after that addition:

| architecture | site | residual stream = input of | norm after the addition |
| --- | --- | --- | --- |
| LLaMA-style | attn / ffn | ``input_layernorm`` / ``post_attention_layernorm`` | none |
| GPT-2 | attn / ffn | ``ln_1`` / ``ln_2`` | none |
| BERT | attn / ffn | ``attention`` / ``intermediate`` | ``attention.output.LayerNorm`` / ``output.LayerNorm`` |

BERT is post-LayerNorm: its sub-block output is ``LayerNorm(dropout(dense(h)) + residual)``,
so the adapter goes on ``dense``'s output, before dropout, the residual and the LayerNorm
(Houlsby et al.'s position). Blocks are recognised by structure, not class name, so Mistral,
Qwen2 and other LLaMA-style decoders work too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Site:
    """One sub-block: the modules a parallel adapter reads from and every adapter adds to."""

    name: str            # "attn" or "ffn"
    input: nn.Module     # its input (``hidden_states``) is the sub-block's input (input = "sublayer")
    output: nn.Module    # the adapter's branch is added to its output (element 0 of a tuple)
    residual: nn.Module | None = None  # its first input is the residual stream (None: not found)
    norm: nn.Module | None = None      # post-LN blocks: the LayerNorm after the residual addition


ARCHITECTURES = "LLaMA-style (self_attn + mlp), GPT-2 (attn + mlp) or BERT (attention + intermediate + output)"


def architecture_of(block: nn.Module) -> str | None:
    """``"llama"``, ``"gpt2"``, ``"bert"``, or ``None`` for a module that is not a block we know."""
    children = dict(block.named_children())
    if isinstance(children.get("self_attn"), nn.Module) and isinstance(children.get("mlp"), nn.Module):
        return "llama"
    if isinstance(children.get("attn"), nn.Module) and isinstance(children.get("mlp"), nn.Module):
        return "gpt2"
    attention, output = children.get("attention"), children.get("output")
    if (attention is not None and "intermediate" in children and isinstance(getattr(output, "dense", None), nn.Linear)
            and isinstance(getattr(getattr(attention, "output", None), "dense", None), nn.Linear)):
        return "bert"
    return None


def sites_of(block: nn.Module) -> dict[str, Site]:
    """The ``attn`` and ``ffn`` sites of ``block``; ``ValueError`` for a block we cannot place into."""
    arch = architecture_of(block)
    if arch == "llama":
        return {"attn": Site("attn", block.self_attn, block.self_attn, _child(block, "input_layernorm")),
                "ffn": Site("ffn", block.mlp, block.mlp, _child(block, "post_attention_layernorm"))}
    if arch == "gpt2":
        return {"attn": Site("attn", block.attn, block.attn, _child(block, "ln_1")),
                "ffn": Site("ffn", block.mlp, block.mlp, _child(block, "ln_2"))}
    if arch == "bert":
        return {"attn": Site("attn", block.attention, block.attention.output.dense, block.attention,
                             _child(block.attention.output, "LayerNorm")),
                "ffn": Site("ffn", block.intermediate, block.output.dense, block.intermediate,
                            _child(block.output, "LayerNorm"))}
    names = ", ".join(n for n, _ in block.named_children()) or "none"
    raise ValueError(f"cannot place a bottleneck adapter into a {type(block).__name__} (children: {names}); "
                     f"target transformer blocks: {ARCHITECTURES}")


def _child(module: nn.Module, name: str) -> nn.Module | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Module) else None


def find_blocks(model: nn.Module) -> list[str]:
    """Names of every transformer block of ``model`` (the default targets), in model order."""
    return [name for name, module in model.named_modules()
            if name and architecture_of(module) is not None
            and not any(p.startswith("adapter_") for p in name.split("."))]
