"""Options, ``build`` and the :class:`Attachment` of the ``bottleneck`` method (family ``module``).

Placements (h: a sub-block's input, f(h): its output before the residual addition, A: the
adapter branch ``up(dropout(act(down(·))))``, s: ``scale``):

- ``series`` (Houlsby et al., 2019): after the attention output and after the FFN output,
  with the adapter's own skip: ``f(h) + s · A(f(h))``.
- ``parallel`` (He et al., 2021): beside both sub-blocks, reading their input:
  ``f(h) + s · A(h)``.
- ``ffn`` (Adapter-FFN, He et al.'s scaled parallel adapter): ``parallel`` on the FFN only.

The adapters are child modules of the block, ``adapter_attn`` and ``adapter_ffn`` (keys
``<block>.adapter_ffn.down.weight`` [r, d], ``.down.bias`` [r], ``.up.weight`` [d, r],
``.up.bias`` [d]); forward hooks on the sub-blocks (see :mod:`modapt_bottleneck.sites`) add
their output. ``detach`` removes the hooks and the children.
"""

from __future__ import annotations

from typing import Literal

import modapt
import pydantic
from torch import nn

from .adapter import ACTIVATIONS, BottleneckAdapter
from .sites import Site, sites_of

PLACEMENT_SITES = {"series": ("attn", "ffn"), "parallel": ("attn", "ffn"), "ffn": ("ffn",)}
#: He et al. (2021) scale the FFN parallel adapter by 4 (the LoRaDA papers use 2 and 4)
DEFAULT_SCALE = {"series": 1.0, "parallel": 1.0, "ffn": 4.0}


class BottleneckOptions(modapt.Options):
    placement: Literal["series", "parallel", "ffn"] = pydantic.Field(
        "series", description="series (Houlsby), parallel (He et al.) or ffn (Adapter-FFN: parallel, FFN only)")
    r: int = pydantic.Field(16, gt=0, description="bottleneck size (the down-projection's output dimension)")
    activation: Literal[tuple(ACTIVATIONS)] = pydantic.Field("relu", description="non-linearity inside the bottleneck")
    scale: float | None = pydantic.Field(
        None, description="factor on the adapter's output; default 1 (series, parallel) or 4 (ffn)")
    dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="dropout after the non-linearity")


def hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        # ValueError, not TypeError: the core turns it into a RecipeError naming the entry
        raise ValueError(f"cannot read the hidden size of {type(model).__name__} (no config.hidden_size)")  # noqa: TRY004
    return size


def build(block: nn.Module, options: BottleneckOptions, model: nn.Module) -> BottleneckAttachment:
    """Put bottleneck adapters into a transformer ``block`` in place; the adapted block equals the base at init."""
    sites = sites_of(block)
    d = hidden_size(model)
    for name in PLACEMENT_SITES[options.placement]:
        if hasattr(block, f"adapter_{name}"):
            raise ValueError(f"{type(block).__name__} already has an 'adapter_{name}'")
    return BottleneckAttachment(block, options, sites, d)


class BottleneckAttachment(modapt.Attachment):
    """The adapters and hooks on one block. Not mergeable: merge/unmerge leave them active."""

    def __init__(self, block: nn.Module, options: BottleneckOptions, sites: dict[str, Site], d: int):
        super().__init__(block, options)
        self.scale = options.scale if options.scale is not None else DEFAULT_SCALE[options.placement]
        self.handles = []
        self.names = []
        parallel = options.placement != "series"
        for name in PLACEMENT_SITES[options.placement]:
            adapter = BottleneckAdapter(d, options.r, options.activation, options.dropout)
            key = f"adapter_{name}"
            block.add_module(key, adapter)
            self.names.append(key)
            site = sites[name]
            if parallel:
                self._hook_parallel(site, key)
            else:
                self.handles.append(site.output.register_forward_hook(self._series_hook(key)))

    # The hooks look the adapter up on the block at call time: .to(), load_state_dict and
    # parameter replacement act on the registered child, never on a stale reference.
    def _adapter(self, key: str) -> BottleneckAdapter:
        return self.module._modules[key]

    def _series_hook(self, key):
        def hook(module, args, output):
            out = _first(output)
            return _replace_first(output, out + self.scale * self._adapter(key)(out))
        return hook

    def _hook_parallel(self, site: Site, key: str) -> None:
        if site.input is site.output:
            def hook(module, args, kwargs, output):
                branch = self._adapter(key)(_hidden_states(args, kwargs, module))
                return _replace_first(output, _first(output) + self.scale * branch)
            self.handles.append(site.output.register_forward_hook(hook, with_kwargs=True))
            return
        # BERT: the sub-block's input is seen by one module, its pre-residual output by another
        stash: list = []

        def remember(module, args, kwargs):
            stash.append(_hidden_states(args, kwargs, module))

        def add(module, args, output):
            if not stash:
                raise modapt.StateError(f"{key}: the sub-block output was computed without its input being seen")
            branch = self._adapter(key)(stash.pop())
            return _replace_first(output, _first(output) + self.scale * branch)

        self.handles.append(site.input.register_forward_pre_hook(remember, with_kwargs=True))
        self.handles.append(site.output.register_forward_hook(add))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for key in self.names:
            delattr(self.module, key)
        self.names.clear()


def _hidden_states(args, kwargs, module):
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if args:
        return args[0]
    raise modapt.StateError(f"{type(module).__name__} was called without hidden states")


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value
