"""AdaLoRA's global steps on FSDP2-sharded parameters (DTensors): gather, decide, scatter back.

The orthogonality term and the rank allocation look at whole matrices across layers (a Gram
matrix, a k-th smallest score over all triplets); under ``fully_shard`` each rank holds only a
row block of P, Λ and Q. Those steps gather the (small) adapter tensors to full ones, which every
rank then holds identically, so every rank reaches the same decision, and a mask computed on
full tensors is applied to each rank's own rows. Without FSDP2 both functions return their input.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # a torch without distributed support: nothing is ever sharded
    DTensor = Replicate = None


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (differentiable; a collective), else ``tensor``."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def laid_out_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (full, the same on every rank) in ``param``'s layout: this rank's rows if sharded."""
    if DTensor is not None and isinstance(param, DTensor):
        mesh = param.device_mesh
        return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
            mesh, param.placements)
    return value
