"""Building LMAM on an attention module, and taking it off (the ``attention`` family contract)."""

from __future__ import annotations

import modapt
import torch
from torch import nn

from . import attention_map, interface, targets
from .options import LmamOptions

# id(config) -> [config, its original implementation, number of LMAM modules using it]
_SWITCHED: dict[int, list] = {}


def switch_config(config, base: str) -> None:
    """Point ``config`` at ``lmam+<base>`` (once per config, counted per adapted module)."""
    entry = _SWITCHED.get(id(config))
    if entry is None or entry[0] is not config:
        entry = _SWITCHED[id(config)] = [config, config._attn_implementation_internal, 0]
    entry[2] += 1
    config._attn_implementation_internal = interface.ensure_registered(base)


def release_config(config) -> None:
    """Undo one :func:`switch_config`; the last one restores the original implementation exactly."""
    entry = _SWITCHED.get(id(config))
    if entry is None or entry[0] is not config:
        # a deep copy of an adapted model: its config was never counted; fall back to the base name
        config._attn_implementation_internal = interface.base_of(config._attn_implementation_internal)
        return
    entry[2] -= 1
    if entry[2] <= 0:
        del _SWITCHED[id(config)]
        if interface.base_of(config._attn_implementation_internal) != config._attn_implementation_internal:
            config._attn_implementation_internal = entry[1]


def original_implementation(config) -> str | None:
    """The implementation ``config`` had before LMAM switched it (its current one otherwise)."""
    entry = _SWITCHED.get(id(config))
    return entry[1] if entry is not None and entry[0] is config else config._attn_implementation_internal


class LmamAttachment(modapt.Attachment):
    """LMAM on one attention module: parameters ``lmam_Wa``, ``lmam_Wb`` (or ``lmam_W``) on its
    ``holder`` (the module itself, or ``modapt_adapters.<name>`` for a further named adapter).

    Switchable: the attention function reads ``enabled``/``rows`` of every LMAM attachment of
    the module (its list ``_modapt_lmam_all``) and routes each batch row (:mod:`.interface`).
    """

    switchable = True

    def __init__(self, module: nn.Module, options: LmamOptions, config, spec: interface.Spec):
        super().__init__(module, options)
        self.config = config
        self.spec = spec

    def keys(self) -> tuple[str, ...]:
        held = set(self.holder._parameters) | set(self.holder._buffers)
        return tuple(k for k in (*attention_map.PARAMETERS, *attention_map.BUFFERS) if k in held)

    def detach(self) -> None:
        attention_map.remove_all(self.holder)
        attached = self.module.__dict__.get(interface.ATTACHED, [])
        if self in attached:
            attached.remove(self)
        if attached:
            self.module.__dict__[interface.SPEC_ATTR] = attached[0].spec
        else:
            self.module.__dict__.pop(interface.ATTACHED, None)
            self.module.__dict__.pop(interface.SPEC_ATTR, None)
        release_config(self.config)

    def merge(self) -> None:
        """Precompute the constant Attn_s [h_s, n, n] (buffer ``lmam_attn_s``); parameters stay."""
        with torch.no_grad():
            attn_s = attention_map.compute_map(self.holder, self.options.scale).detach().clone()
        self.unmerge()
        self.holder.register_buffer(attention_map.MERGED, attn_s, persistent=False)

    def unmerge(self) -> None:
        for name in (attention_map.MERGED, attention_map.GRAPH):  # the export's constant derives from the map
            self.holder._buffers.pop(name, None)
            self.holder._non_persistent_buffers_set.discard(name)

    @property
    def merged(self) -> bool:
        return self.holder._buffers.get(attention_map.MERGED) is not None


def build(module: nn.Module, options: LmamOptions, model: nn.Module) -> LmamAttachment:
    """Register LMAM on ``module`` and route the module's attention through ``lmam+<base>``.

    Raises ValueError (the core reports it as a RecipeError naming the entry) when the module
    does not dispatch through transformers' attention interface, when ``heads`` does not
    divide the number of query heads, or when the base implementation is not supported.
    """
    if not targets.is_self_attention(module):
        raise ValueError(f"{type(module).__name__} is not a self-attention module that dispatches through "
                         "transformers' AttentionInterface (LMAM targets modules such as LlamaAttention, "
                         "GPT2Attention, BertSelfAttention; leave `targets` out to adapt all of them)")
    config = module.config
    base = interface.base_of(config._attn_implementation_internal)
    if base not in interface.SUPPORTED_BASES:
        raise ValueError(f"LMAM runs on top of the model's attention implementation; supported: "
                         f"{', '.join(interface.SUPPORTED_BASES)}; this model uses {base!r} "
                         "(load it with attn_implementation='sdpa' or 'eager')")
    if base == "eager" and interface.eager_function(type(module)) is None:
        raise ValueError(f"{type(module).__module__} has no eager_attention_forward; load the model with "
                         "attn_implementation='sdpa'")
    if options.nonnegative is True and base.startswith("flash"):
        raise ValueError("nonnegative = true (¬N) adds the map to the attention scores, which flash attention "
                         "cannot take; load the model with attn_implementation='sdpa' or 'eager'")
    heads = targets.query_heads(module)
    lmam_heads = options.heads or heads
    if heads % lmam_heads:
        raise ValueError(f"heads = {lmam_heads} must divide the module's {heads} attention heads "
                         f"(accepted: {', '.join(str(d) for d in range(1, heads + 1) if heads % d == 0)})")
    attention_map.add_parameters(module, options, lmam_heads)
    causal = bool(getattr(module, "is_causal", False)) and bool(getattr(config, "is_causal", True))
    spec = interface.Spec(n=options.n, scale=options.scale, align=options.align, nonnegative=options.nonnegative,
                          causal=causal)
    module.__dict__.setdefault(interface.SPEC_ATTR, spec)  # the first LMAM of the module (export reads it)
    switch_config(config, base)
    attachment = LmamAttachment(module, options, config, spec)
    module.__dict__.setdefault(interface.ATTACHED, []).append(attachment)
    return attachment
