"""AdaLoRA's cross-layer training state, held on the model through :mod:`modapt.shared`.

One :class:`BudgetState` per schedule (the values of :data:`~.options.SCHEDULE_KEYS`), made
by the first AdaLoRA layer built with that schedule inside :func:`modapt.apply` and registered
as ``model.modapt_shared["adalora_<schedule>"]``. It holds what the rank allocator carries from
one optimizer step to the next:

- the importance averages Ī (``sensitivity``) and Ū (``uncertainty``) of every scored
  parameter, each shaped like it (P [out, r], Λ [r, 1], Q [r, in]), as non-persistent buffers
  named ``sensitivity/<path>/<key>`` (dots of the path as ``/``): ``model.to()`` moves them
  with the model, ``model.state_dict()`` leaves them out (like optimizer moments they are
  training state, written by :func:`modapt.training.save_training_state`);
- the budget the last allocation kept (a Python int, ``None`` before the first);
- the :class:`~.allocator.RankAllocator` built over it (a plain attribute, rebuilt when the
  adapted layers change; rebuilding clears the scores).

The rank pattern itself is not here: it is each layer's ``rank_pattern`` buffer, saved with
the adapter. Built outside an apply (export's streaming merge, one layer at a time) a layer
gets a private state: it never trains there.
"""

from __future__ import annotations

import torch
from modapt import StateError
from modapt.shared import shared_module
from torch import nn

KINDS = ("sensitivity", "uncertainty")


def budget_state_for(schedule_key: tuple) -> BudgetState:
    """The model's shared state for ``schedule_key`` (a private one outside :func:`modapt.apply`)."""
    name = "adalora_" + "_".join(str(v) for v in schedule_key)
    try:
        return shared_module(name, BudgetState)
    except StateError:  # no model being adapted: a lone layer that will not train
        return BudgetState()


class BudgetState(nn.Module):
    """Importance averages and budget of one AdaLoRA schedule (see the module)."""

    def __init__(self):
        super().__init__()
        self.budget: int | None = None
        self.names: list[str] = []  # "<path>.<key>" of the scored parameters, in scoring order
        self.allocator = None  # (identity of the hosts, RankAllocator)

    @staticmethod
    def _buffer(kind: str, name: str) -> str:
        return f"{kind}/{name.replace('.', '/')}"

    def scores(self, kind: str) -> list[torch.Tensor]:
        """The ``kind`` averages in scoring order, [] before the first scored step."""
        return [self._buffers[self._buffer(kind, n)] for n in self.names]

    def set_scores(self, kind: str, names: list[str], tensors: list[torch.Tensor]) -> None:
        """Replace the ``kind`` averages (``tensors`` [] clears both kinds)."""
        if not tensors:
            self.clear()
            return
        self.names = list(names)
        for name, tensor in zip(names, tensors):
            self.register_buffer(self._buffer(kind, name), tensor, persistent=False)

    def clear(self) -> None:
        """Forget the averages (the final allocation, or other layers)."""
        for key in [k for k in self._buffers if k.split("/", 1)[0] in KINDS]:
            del self._buffers[key]
        self.names = []
