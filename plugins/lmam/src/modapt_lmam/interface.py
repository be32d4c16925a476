"""LMAM inside transformers' attention interface.

transformers 5 attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
config._attn_implementation, eager_attention_forward)(module, query, key, value,
attention_mask, scaling=..., dropout=..., **kwargs)``, and the model builds its masks with
``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``. LMAM registers one wrapping
implementation per base implementation, named ``lmam+<base>`` (``lmam+sdpa``, ``lmam+eager``,
``lmam+flash_attention_2``), in both interfaces, and switches the config of the adapted
attention modules to it. The wrapper calls the base implementation unchanged and adds the
LMAM term (:mod:`modapt_lmam.term`) for modules that carry LMAM parameters; modules that do
not (untargeted layers sharing the config) get the base implementation only.

Masks: a function registered in ``AttentionInterface`` alone receives ``attention_mask=None``
(causality and padding silently lost), so every name is registered in
``AttentionMaskInterface`` too. Run eagerly, ``lmam+<base>`` builds exactly the mask the base
would get (``sdpa_mask``, ``eager_mask``, ``flash_attention_mask``), so the base attention keeps
its fast paths (SDPA's ``is_causal`` for unpadded batches: a 4D float mask costs SDPA on CPU
30-60% at N = 2048) and its numerics; the LMAM term reads causality from the module when the
mask is ``None`` or 2D. Under ``torch.export`` (and compile, jit tracing) eager and SDPA bases
always get ``eager_mask`` with both skips disabled, a float mask [B, 1, q, L]: ``sdpa_mask``'s
data-dependent ``None`` for an unpadded sample would be baked into the exported graph.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from modapt.tracing import tracing

from . import graph_term, term
from .attention_map import current_map

PREFIX = "lmam+"
SUPPORTED_BASES = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
SPEC_ATTR = "_modapt_lmam"
ATTACHED = "_modapt_lmam_all"  # the module's LmamAttachments (several with named adapters)


@dataclass(frozen=True)
class Spec:
    """What the attention function needs to know about one adapted module (kept on it as ``_modapt_lmam``).

    causal: the module attends causally (a decoder): the map is masked by its lower triangle (eq. 11).
    nonnegative: ``False`` (LMAM), ``True`` (¬N: inside the softmax) or ``"softmax"`` (¬S).
    """

    n: int
    scale: float
    align: str
    nonnegative: bool | str
    causal: bool


def implementation_name(base: str) -> str:
    return PREFIX + base


def base_of(name: str | None) -> str | None:
    """The base implementation behind ``lmam+<base>``, or ``name`` itself."""
    return name[len(PREFIX):] if name and name.startswith(PREFIX) else name


def base_function(module, base: str):
    """The attention function the module would use under ``base``.

    ``eager`` is not in ``ALL_ATTENTION_FUNCTIONS``: each modeling file has its own
    ``eager_attention_forward``, found in the module's own Python module. GPT-2's
    ``reorder_and_upcast_attn`` path is kept as GPT-2 itself would take it.
    """
    if base == "eager":
        if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
            return _reordered_eager
        return eager_function(type(module))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def eager_function(cls):
    """The ``eager_attention_forward`` of the modeling file that defines ``cls`` (None if absent)."""
    return getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)


def _reordered_eager(module, query, key, value, attention_mask, **kwargs):
    return module._upcast_and_reordered_attn(query, key, value, attention_mask)


def _make_attention(base: str):
    def lmam_attention(module, query, key, value, attention_mask, **kwargs):
        forward = base_function(module, base)
        spec = module.__dict__.get(SPEC_ATTR)
        if spec is None:
            return forward(module, query, key, value, attention_mask, **kwargs)
        attached = module.__dict__.get(ATTACHED)
        if attached is None:  # a deep copy's or an older state: the module's own parameters
            return _with_map(module, spec, module, base, forward, query, key, value, attention_mask, **kwargs)
        if len(attached) == 1 and attached[0].rows is None:  # one adapter (or one active): no routing
            only = attached[0]
            if not only.enabled:
                return forward(module, query, key, value, attention_mask, **kwargs)
            return _with_map(module, only.spec, only.holder, base, forward, query, key, value, attention_mask,
                             **kwargs)
        return _routed(module, attached, base, forward, query, key, value, attention_mask, **kwargs)

    lmam_attention.__name__ = f"lmam_{base}_attention"
    return lmam_attention


def _with_map(module, spec: Spec, holder, base: str, forward, query, key, value, attention_mask, **kwargs):
    """The base attention plus the LMAM term of the map held by ``holder`` (one adapter)."""
    q, length, heads = query.shape[2], key.shape[2], query.shape[1]
    if spec.align == "head" and isinstance(length, int) and length - q >= spec.n:
        return forward(module, query, key, value, attention_mask, **kwargs)  # decoding past the map
    if (base == "sdpa" and spec.nonnegative is False and torch.compiler.is_exporting()
            and graph_term.applies(module, attention_mask, query, key, kwargs)):
        return graph_term.attention(module, query, key, value, attention_mask, spec.n, spec.align, **kwargs)
    attn_s = current_map(holder, spec.scale)
    if spec.nonnegative is True:
        if attention_mask is None or attention_mask.dim() != 4:
            raise RuntimeError("LMAM's nonnegative = true needs a 4D attention mask (eager or sdpa attention)")
        biased = term.scores_bias(attention_mask, attn_s, heads, q, length, spec.align)
        return forward(module, query, key, value, biased, **kwargs)
    output, weights = forward(module, query, key, value, attention_mask, **kwargs)
    blk = term.block(attn_s, q, length, attention_mask, causal=spec.causal, align=spec.align)
    added = term.block_weights(blk, heads, spec.nonnegative == "softmax")
    values = term.block_values(value, blk)
    output = term.add_rows(output, term.apply_weights(added, values), spec.align)
    if weights is not None and not tracing() and weights.dim() == 4 and weights.shape[-1] == length:
        weights = term.add_to_weights(weights, added, blk, q)
    return output, weights


def _routed(module, attached, base: str, forward, query, key, value, attention_mask, **kwargs):
    """Several named LMAM adapters on one module (``modapt.named``): the base attention for
    every row, then each enabled adapter recomputes its rows (all rows when ``rows`` is None)
    and writes them over: outputs [B, q, h, d], weights [B, h, q, L] scattered on dim 0."""
    if all(one.rows is None for one in attached):  # switched, not mixed: one adapter per module is active
        on = next((one for one in attached if one.enabled), None)
        if on is None:
            return forward(module, query, key, value, attention_mask, **kwargs)
        return _with_map(module, on.spec, on.holder, base, forward, query, key, value, attention_mask, **kwargs)
    output, weights = forward(module, query, key, value, attention_mask, **kwargs)
    batch = query.shape[0]
    for one in attached:
        if not one.enabled or one.rows is None or one.rows.numel() == 0:
            continue
        idx = one.rows
        mask = attention_mask
        if isinstance(mask, torch.Tensor) and mask.dim() >= 1 and mask.shape[0] == batch and batch > 1:
            mask = mask.index_select(0, idx)
        out, w = _with_map(module, one.spec, one.holder, base, forward, query.index_select(0, idx),
                           key.index_select(0, idx), value.index_select(0, idx), mask, **kwargs)
        output = output.index_copy(0, idx, out)
        if weights is not None and w is not None:
            weights = weights.index_copy(0, idx, w)
    return output, weights


def _make_mask(base: str):
    from transformers import masking_utils

    def lmam_mask(*args, **kwargs):
        if tracing() and not base.startswith("flash"):
            # a graph must not depend on whether the sample batch was padded: always a 4D mask
            kwargs.pop("allow_is_causal_skip", None)
            kwargs["allow_is_bidirectional_skip"] = False
            return masking_utils.eager_mask(*args, **kwargs)
        # eagerly: exactly the mask the base implementation would get (None is fine: see term.keep_mask)
        return masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)

    lmam_mask.__name__ = f"lmam_{base}_mask"
    return lmam_mask


def ensure_registered(base: str) -> str:
    """Register ``lmam+<base>`` in both interfaces (idempotent); return the name."""
    from transformers import masking_utils
    from transformers.modeling_utils import AttentionInterface

    name = implementation_name(base)
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(base))
    if name not in masking_utils.AttentionMaskInterface._global_mapping:
        masking_utils.AttentionMaskInterface.register(name, _make_mask(base))
    return name
