"""AdaLoRA's orthogonality regulariser R(P, Q) = ‖PᵀP - I‖_F + ‖QQᵀ - I‖_F (paper eq. 4).

PEFT 0.21 averages the norms over every ``lora_A`` and ``lora_B`` it finds (two per layer)
and adds ``orth_reg_weight`` times that mean to the model's loss inside ``forward``; modapt
returns the same term from the ``modapt_regularization_loss`` hook, so the training loop adds
it (``loss + modapt.regularization_loss(model)``). Masked triplets count too, as in PEFT.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def orthogonality(hosts: Iterable[nn.Module]) -> torch.Tensor:
    """Mean over the layers' Q [r, in] and P [out, r] of ‖QQᵀ - I_r‖_F and ‖PᵀP - I_r‖_F (a 0-dim tensor)."""
    norms = []
    device = None
    for host in hosts:
        q, p = host.lora_A, host.lora_B
        device = device or q.device
        eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
        norms.append(torch.linalg.matrix_norm(q @ q.t() - eye).to(device))
        norms.append(torch.linalg.matrix_norm(p.t() @ p - eye).to(device))
    return torch.stack(norms).mean()
