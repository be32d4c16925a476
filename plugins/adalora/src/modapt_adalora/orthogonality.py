"""AdaLoRA's orthogonality regulariser R(P, Q) = ‖PᵀP - I‖_F + ‖QQᵀ - I‖_F (paper eq. 4).

PEFT 0.21 averages the norms over every ``lora_A`` and ``lora_B`` it finds (two per layer)
and adds ``orth_reg_weight`` times that mean to the model's loss inside ``forward``; modapt
returns the same term from the ``modapt_regularization_loss`` hook, so the training loop adds
it (``loss + modapt.regularization_loss(model)``). Masked triplets count too, as in PEFT.

Both terms are ‖M Mᵀ - I_r‖_F with M = Q [r, in] or M = Pᵀ [r, out]. Matrices of one shape
are stacked and handled by one batched matmul and one batched norm, instead of a handful of
small kernels per layer (hundreds of layers make that launch-bound on a GPU); the stack's
copy is the size of the adapter, about 1% of the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .sharding import full


def orthogonality(hosts: Iterable[nn.Module]) -> torch.Tensor:
    """Mean over the layers' Q [r, in] and P [out, r] of ‖QQᵀ - I_r‖_F and ‖PᵀP - I_r‖_F (a 0-dim tensor).

    Q's are stacked as they are ([L, r, in], Gram = S Sᵀ) and P's too ([L, out, r], Gram = SᵀS):
    no per-layer transpose, one stack, one batched matmul, one subtraction and one norm per shape.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for host in hosts:
        for key in ("lora_A", "lora_B"):
            m = full(getattr(host, key))  # FSDP2: gathered
            groups.setdefault((key, tuple(m.shape), m.device, m.dtype), []).append(m)
    norms = []
    for (key, shape, device, dtype), mats in groups.items():
        stacked = torch.stack(mats)                                        # [L, r, in] or [L, out, r]
        if key == "lora_A":
            gram, r = stacked @ stacked.transpose(1, 2), shape[0]          # Q Qᵀ [L, r, r]
        else:
            gram, r = stacked.transpose(1, 2) @ stacked, shape[1]          # Pᵀ P [L, r, r]
        norms.append(torch.linalg.matrix_norm(gram - torch.eye(r, dtype=dtype, device=device)))  # [L]
    device = norms[0].device
    return torch.cat([n.to(device) for n in norms]).mean()
