"""Options, ``build`` and the :class:`Attachment` of the ``bottleneck`` method (family ``module``).

Placements (h: a sub-block's input, f(h): its output before the residual addition, A: the
adapter branch ``up(dropout(act(down(·))))``, s: ``scale``):

- ``series`` (Houlsby et al., 2019): after the attention output and after the FFN output,
  with the adapter's own skip: ``f(h) + s · A(f(h))``.
- ``parallel`` (He et al., 2021): beside both sub-blocks, reading their input:
  ``f(h) + s · A(h)``.
- ``ffn`` (Adapter-FFN, He et al.'s scaled parallel adapter): ``parallel`` on the FFN only.
- ``pfeiffer`` (Pfeiffer et al., 2021; AdapterHub's ``SeqBnConfig``): FFN only, reading the
  stream after the residual addition (and, post-LN, after the block's LayerNorm) with the
  sub-block output as skip: ``f(h) + s · A(LN(f(h) + r))`` (LN the identity in pre-LN blocks),
  r the residual stream; the block then adds r (and applies LN) as usual.

``input`` (parallel and ffn): ``"sublayer"`` reads h, the sub-block's own input (the normalised
stream in pre-LN blocks: He et al.'s "same input as the sublayer", and LLM-Adapters' LLaMA code,
whose parallel adapters sit beside q/k/v and the MLP projections); ``"residual"`` reads r, the
residual stream before the norm (AdapterHub's ``ParallelAdapter``). They coincide in BERT.

The adapters are child modules of the block, ``adapter_attn`` and ``adapter_ffn`` (keys
``<block>.adapter_ffn.down.weight`` [r, d], ``.down.bias`` [r], ``.up.weight`` [d, r],
``.up.bias`` [d]); forward hooks on the sub-blocks (see :mod:`modapt_bottleneck.sites`) add
their output. ``detach`` removes the hooks and the children.
"""

from __future__ import annotations

import modapt
from torch import nn

from .adapter import BottleneckAdapter
from .options import BottleneckOptions
from .sites import Site, sites_of

PLACEMENT_SITES = {"series": ("attn", "ffn"), "parallel": ("attn", "ffn"), "ffn": ("ffn",), "pfeiffer": ("ffn",)}
#: He et al. (2021) scale the FFN parallel adapter by 4 (the LoRaDA papers use 2 and 4)
DEFAULT_SCALE = {"series": 1.0, "parallel": 1.0, "ffn": 4.0, "pfeiffer": 1.0}


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
        if _reads_residual(options) and sites[name].residual is None:
            raise ValueError(f"cannot find the residual stream of {type(block).__name__}'s {name} sub-block "
                             f"(placement = {options.placement!r}, input = {options.input!r})")
    return BottleneckAttachment(block, options, sites, d)


def _reads_residual(options: BottleneckOptions) -> bool:
    return options.placement == "pfeiffer" or options.input == "residual"


class BottleneckAttachment(modapt.Attachment):
    """The adapters and hooks on one block. Not mergeable: merge/unmerge leave them active.

    Switchable: the hooks read their adapter from ``holder`` and honour ``enabled`` (off: the
    sub-block's output is returned untouched) and ``rows`` (only those batch rows get
    ``s · A(·)`` added, by ``index_add``). Two bottlenecks of different named adapters on one
    block each have their own hooks, run in the order they were added.
    """

    switchable = True

    def __init__(self, block: nn.Module, options: BottleneckOptions, sites: dict[str, Site], d: int):
        super().__init__(block, options)
        self.scale = options.scale if options.scale is not None else DEFAULT_SCALE[options.placement]
        self.handles = []
        self.names = []
        for name in PLACEMENT_SITES[options.placement]:
            adapter = BottleneckAdapter(d, options.size(d), options.activation, options.dropout)
            key = f"adapter_{name}"
            block.add_module(key, adapter)
            self.names.append(key)
            site = sites[name]
            if options.placement == "series":
                self.handles.append(site.output.register_forward_hook(self._series_hook(key)))
            elif options.placement == "pfeiffer":
                self._hook_pfeiffer(site, key)
            elif options.input == "residual":
                self._hook_stashed(site.residual, site.output, key, lambda f, r: r)
            else:
                self._hook_parallel(site, key)

    # The hooks look the adapter up on the block at call time: .to(), load_state_dict and
    # parameter replacement act on the registered child, never on a stale reference.
    def _adapter(self, key: str) -> BottleneckAdapter:
        return self.holder._modules[key]

    def keys(self) -> tuple[str, ...]:
        return tuple(self.names)

    def _added(self, key: str, f, x):
        """f + s · A(x) on the adapted rows: every row, or ``rows`` (f, x [B, ...])."""
        if self.rows is None:
            return f + self.scale * self._adapter(key)(x)
        return f.index_add(0, self.rows, self.scale * self._adapter(key)(x.index_select(0, self.rows)))

    def _series_hook(self, key):
        def hook(module, args, output):
            if not self.enabled:
                return None
            out = _first(output)
            return _replace_first(output, self._added(key, out, out))
        return hook

    def _hook_parallel(self, site: Site, key: str) -> None:
        if site.input is site.output:
            def hook(module, args, kwargs, output):
                if not self.enabled:
                    return None
                return _replace_first(output, self._added(key, _first(output), _hidden_states(args, kwargs, module)))
            self.handles.append(site.output.register_forward_hook(hook, with_kwargs=True))
            return
        # BERT: the sub-block's input is seen by one module, its pre-residual output by another
        self._hook_stashed(site.input, site.output, key, lambda f, h: h)

    def _hook_pfeiffer(self, site: Site, key: str) -> None:
        # AdapterHub's SeqBn: the adapter reads LN(f + r) (LN: the block's own post-LN norm, if any)
        norm = site.norm

        def adapter_input(f, r):
            return norm(f + r) if norm is not None else f + r
        self._hook_stashed(site.residual, site.output, key, adapter_input)

    def _hook_stashed(self, source: nn.Module, target: nn.Module, key: str, adapter_input) -> None:
        """``target``'s output f becomes f + s · A(adapter_input(f, x)), x the hidden states ``source`` last read."""
        stash: list = []

        def remember(module, args, kwargs):
            stash.append(_hidden_states(args, kwargs, module))

        def add(module, args, output):
            if not stash:
                raise modapt.StateError(f"{key}: the sub-block output was computed without its input being seen")
            seen = stash.pop()
            if not self.enabled:
                return None
            f = _first(output)
            return _replace_first(output, self._added(key, f, adapter_input(f, seen)))

        self.handles.append(source.register_forward_pre_hook(remember, with_kwargs=True))
        self.handles.append(target.register_forward_hook(add))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for key in self.names:
            delattr(self.holder, key)
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
