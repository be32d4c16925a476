"""The contract of attention and module adapters (families ``attention`` and ``module``).

These do not wrap a weight: an attention adapter (LMAM) adds its parameters to an attention
module and changes how it attends; a module adapter (bottleneck) inserts a small module on
the residual path. The method's ``build(module, options, model)`` does that in place and
returns an :class:`Attachment`, which the core keeps to merge, unmerge and remove it.
Parameters are registered on ``module`` (or on a child it adds), under the method's own keys,
so their names are the module path plus the key (``self_attn.lmam_Wa``).

Several named adapters (:mod:`modapt.named`) need more, declared by ``switchable = True``:

- the attachment reads its tensors from ``holder`` at call time, never from ``module``
  directly. ``holder`` is ``module`` for the adapter that came first on that module (its
  names stay ``self_attn.lmam_Wa``); a further adapter's tensors are moved by the core to
  ``<module>.modapt_adapters.<name>`` (``self_attn.modapt_adapters.b.lmam_Wa``), and saving
  that adapter alone writes them under the single-adapter names again;
- :meth:`keys` names the tensors and children it registered (direct keys of ``holder``);
- it honours ``enabled`` and ``rows`` in its forward: ``enabled`` False: the module computes
  exactly what the base module computes (bit for bit); ``rows`` a long tensor [n] of batch
  indices: only those rows are adapted, the others get the base output (``modapt.rows``).

A model with one adapter never changes ``enabled`` (True) nor ``rows`` (None): no cost.
"""

from __future__ import annotations

import torch
from torch import nn


class Attachment:
    """What an attention or module adapter did to one module, and how to undo it."""

    #: declared capability: honours ``holder``, ``enabled`` and ``rows`` (see the module doc),
    #: so that the adapter can share a model with other named adapters
    switchable: bool = False

    def __init__(self, module: nn.Module, options):
        self.module = module
        self.options = options
        self.holder: nn.Module = module  # where its tensors live (moved by modapt.named)
        self.enabled = True
        self.rows: torch.Tensor | None = None  # long [n]: the batch rows it adapts; None: every row

    def keys(self) -> tuple[str, ...]:
        """The keys it registered on ``holder`` (parameters, buffers, child modules); switchable only."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove the adapter: the module behaves and is named exactly as before ``build``."""
        raise NotImplementedError

    def merge(self) -> None:
        """Called by ``modapt.merge``: precompute constants for inference (LMAM's ``Attn_s``).

        The adapter stays active: these families never fold into base weights.
        """

    def unmerge(self) -> None:
        """Undo :meth:`merge` so that training can continue."""
