"""The contract of attention and module adapters (families ``attention`` and ``module``).

These do not wrap a weight: an attention adapter (LMAM) adds its parameters to an attention
module and changes how it attends; a module adapter (bottleneck) inserts a small module on
the residual path. The method's ``build(module, options, model)`` does that in place and
returns an :class:`Attachment`, which the core keeps to merge, unmerge and remove it.
Parameters are registered on ``module`` (or on a child it adds), under the method's own keys,
so their names are the module path plus the key (``self_attn.lmam_Wa``).
"""

from __future__ import annotations

from torch import nn


class Attachment:
    """What an attention or module adapter did to one module, and how to undo it."""

    def __init__(self, module: nn.Module, options):
        self.module = module
        self.options = options

    def detach(self) -> None:
        """Remove the adapter: the module behaves and is named exactly as before ``build``."""
        raise NotImplementedError

    def merge(self) -> None:
        """Called by ``modapt.merge``: precompute constants for inference (LMAM's ``Attn_s``).

        The adapter stays active: these families never fold into base weights.
        """

    def unmerge(self) -> None:
        """Undo :meth:`merge` so that training can continue."""
