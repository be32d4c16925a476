"""State shared by the adapters of many layers, created once per model at apply time.

An update or reparam keeps its own tensors on its host layer (:mod:`modapt.update`). Some
methods need tensors that every adapted layer reads: VeRA's frozen random projections A
[r, largest in] and B [largest out, r], sliced per layer. Copying them onto each host would
defeat the method; a module-level global would be shared by every model in the process.

While :func:`modapt.apply` builds a model's adapters, a method's ``build`` calls
:func:`shared_module` with a name of its own (``vera:<key>:<r>``) and a factory; the module is
created once and registered on the model as ``model.modapt_shared[<name>]`` (an
``nn.ModuleDict`` child of the model). So its tensors are:

- moved by ``model.to()`` / ``.cuda()`` once (the update keeps a reference to the *module*,
  never to a tensor, and reads its buffers at call time, so it sees the moved ones);
- saved once by ``model.state_dict()`` if they are persistent buffers or parameters (VeRA's
  are non-persistent: they are regenerated from ``projection_prng_key``), under
  ``modapt_shared.<name>.<tensor>``;
- seen by FSDP2 as the root module's own: ``fully_shard(model)`` shards shared parameters with
  the root's and replicates buffers (FSDP2 never shards buffers).

``modapt.remove`` and ``merge(unload=True)`` take ``model.modapt_shared`` off again. Outside
an apply (the export package's streaming merge builds one layer at a time on a skeleton)
there is no model: :func:`shared_module` raises :class:`~modapt.errors.StateError`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

from torch import nn

from .errors import StateError

SHARED_ATTR = "modapt_shared"

_MODEL: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar("modapt_applying", default=None)


@contextlib.contextmanager
def applying(model: nn.Module) -> Iterator[None]:
    """The apply-time context: within it, :func:`shared_module` registers on ``model``."""
    token = _MODEL.set(model)
    try:
        yield
    finally:
        _MODEL.reset(token)


def shared_module(name: str, factory: Callable[[], nn.Module]) -> nn.Module:
    """The model's shared module ``name``, made by ``factory()`` on first use.

    Call it from a method's ``build`` (inside :func:`modapt.apply`). ``name`` must identify
    everything that makes the state (VeRA: the key and the rank), since two adapter entries
    asking for the same name get the same module. Hold the returned module on the update as
    a plain attribute (not a submodule of the host, which would save it once per layer).
    """
    model = _MODEL.get()
    if model is None:
        raise StateError(f"shared adapter state '{name}' can only be created inside modapt.apply "
                         "(this method cannot be built one layer at a time)")
    table = getattr(model, SHARED_ATTR, None)
    if table is None:
        table = nn.ModuleDict()
        setattr(model, SHARED_ATTR, table)
    key = name.replace(".", "_")  # ModuleDict keys cannot hold dots
    if key not in table:
        table[key] = factory()
    return table[key]


def drop(model: nn.Module) -> None:
    """Take the shared modules off ``model`` (when its adapters are removed or unloaded)."""
    if SHARED_ATTR in model._modules:
        del model._modules[SHARED_ATTR]
