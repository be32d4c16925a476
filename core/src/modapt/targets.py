"""Which modules of a model a recipe entry adapts.

A target is a module-name suffix (``q_proj`` matches ``model.layers.0.self_attn.q_proj``),
a regular expression prefixed ``re:`` (matched against the whole name), a module class name
(``LlamaAttention``), or ``all-linear``: every linear layer except the model's output layer
(its output embeddings and a classification head).
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from . import layers
from .errors import TargetError

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return _suffix_match(name, target) or type(module).__name__ == target


def _output_layers(model: nn.Module) -> set[int]:
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        out.add(id(head))
    for name, module in model.named_modules():
        if name.split(".")[-1] in HEAD_NAMES or name.startswith(tuple(h + "." for h in ("classifier", "score"))):
            out.add(id(module))
    return out


def match_targets(model: nn.Module, targets: tuple[str, ...], *, path: str, source: str | None = None,
                  exclude: set[str] = frozenset()) -> list[str]:
    """Names of the modules matched by ``targets``, in model order.

    Every target must match at least one module, otherwise :class:`TargetError` names the
    target and the closest module names. ``exclude`` holds names that are never matched
    (modules already wrapped by an earlier adapter keep their inner names out).
    """
    for target in targets:
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as exc:
                raise TargetError(f"invalid regular expression {target!r}: {exc}", path=path, source=source) from None
    named = [(n, m) for n, m in model.named_modules() if n and n not in exclude and ".base_layer" not in n
             and not n.endswith("base_layer")]
    chosen: list[str] = []
    heads = _output_layers(model) if ALL_LINEAR in targets else set()
    for target in targets:
        if target == ALL_LINEAR:
            hits = [n for n, m in named if layers.layer_kind(m) in ("linear", "conv1d") and id(m) not in heads
                    and not _inside_adapter(n)]
        else:
            hits = [n for n, m in named if _matches(n, m, target) and not _inside_adapter(n)]
        if not hits:
            raise TargetError(f"target {target!r} matches no module in {type(model).__name__}; "
                              f"close names: {', '.join(_close(target, [n for n, _ in named])) or 'none'}",
                              path=path, source=source)
        chosen += [h for h in hits if h not in chosen]
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(chosen, key=order.__getitem__)


def _inside_adapter(name: str) -> bool:
    """Modules that adapters themselves added (lora_A, adapter_down...) are never targets."""
    parts = name.split(".")
    return any(p.startswith(("lora_", "lorma_", "lmam_", "adapter_", "modapt_")) for p in parts)


def _close(target: str, names: list[str]) -> list[str]:
    key = target[3:] if target.startswith("re:") else target
    leaves = sorted({n.split(".")[-1] for n in names})
    close = difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
    return close or leaves[:8]
