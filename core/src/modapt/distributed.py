"""modapt under the engines users already run: ``torch.distributed`` DDP and FSDP2 (``fully_shard``).

modapt adds no trainer of its own. An adapted model is an ordinary ``nn.Module``: wrap it in
``DistributedDataParallel`` or shard it with ``fully_shard`` after ``modapt.apply``, and train as
usual. What this module adds is what a sharded run needs from modapt:

* :func:`unwrap` — the adapted model inside a DDP wrapper (the training hooks and ``save``
  read ``model.modapt_state``, which lives on the inner module; FSDP2 shards in place, so
  there the model is its own inner module).
* :func:`shard_decoder` — FSDP2 the way that works with a frozen base and trainable adapters:
  one ``fully_shard`` group per decoder layer, then the root (frozen and trainable parameters
  may share a group: FSDP2 all-gathers both and reduce-scatters only the gradients that exist).
* :func:`adapter_full_state_dict` and :func:`save` — gather the adapter (only the adapter, one
  tensor at a time) to full tensors, and let rank 0 alone write it through ``modapt.save``'s
  atomic writer. The files are the same as those of a single-process run: ``modapt.load``
  and ``modapt.merge`` work on them unchanged.
* :func:`rank_shard` — the indices of one rank's part of a dataset.

Every function that gathers is a collective: every rank must call it, in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .apply import adapter_state_dict, state_of
from .fingerprint import fingerprint
from .persistence import base_weight_getter, full_tensor
from .persistence import save as _save


def is_distributed() -> bool:
    """Whether a default process group is initialised (with more than one rank or not)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    """Whether the environment variables of ``torchrun`` / ``accelerate launch`` are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's env vars (if set and not yet done).

    backend: ``None`` picks ``nccl`` when CUDA is available, else ``gloo``. On CUDA the
    local rank's device is made current. Returns whether a process group is now initialised.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def unwrap(model: nn.Module) -> nn.Module:
    """The adapted model inside a ``DistributedDataParallel`` (or ``torch.compile``) wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a ``transformers`` model (``model.model.layers``, ``transformer.h``, ...)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "bert.encoder.layer",
                 "layers", "h", "encoder.layer"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise ValueError(f"{type(model).__name__}: no decoder layers found; shard the blocks yourself with fully_shard")


def shard_decoder(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root; returns the same (now sharded) model.

    Call after ``modapt.apply`` (the adapter parameters must exist before sharding) and before
    building the optimizer (it must see the sharded parameters). ``fsdp_kwargs`` go to every
    ``fully_shard`` call (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...).

    Scalar (0-dim) parameters, such as MAP's ``map_alpha`` and ``map_beta``, cannot be sharded
    (``fully_shard`` refuses them) and their names and shapes are fixed: they are passed as
    ``ignored_params`` (replicated, kept in their own dtype, fp32) and their gradients are
    averaged over the ranks by a post-accumulate hook, in fp32, as DDP would.
    """
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in model.parameters() if p.dim() == 0}
    ignored = set(fsdp_kwargs.pop("ignored_params", None) or ()) | scalars
    for block in decoder_layers(model):
        fully_shard(block, ignored_params=ignored, **fsdp_kwargs)
    fully_shard(model, ignored_params=ignored, **fsdp_kwargs)
    mesh = fsdp_kwargs.get("mesh")
    group = mesh.get_group() if mesh is not None else None
    for param in _ordered(model, scalars):
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_averager(group))
    return model


def _ordered(model: nn.Module, params: set) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p in params]


def _averager(group):
    def average(param: torch.Tensor) -> None:
        # SUM then divide: gloo has no AVG; every rank runs the same backward, so the same hooks
        # fire in the same order and the collectives match
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
        param.grad.div_(dist.get_world_size(group))
    return average


def adapter_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (``modapt.adapter_state_dict``) as full CPU tensors, on every rank.

    Collective under FSDP2: each sharded tensor is all-gathered, one at a time, so the peak is
    one adapter tensor, never the base model.
    """
    return {k: full_tensor(v).detach().to("cpu").clone() for k, v in adapter_state_dict(unwrap(model)).items()}


def save(model: nn.Module, directory: str | os.PathLike, **kwargs) -> Path | None:
    """``modapt.save`` from a DDP or FSDP2 run: every rank calls it, rank 0 alone writes.

    Rank 0 runs ``modapt.save`` (atomic writes: tensors, then the config that vouches for them);
    the other ranks take part in the same all-gathers in the same order (the adapter tensors,
    then the fingerprinted base tensors), and everyone waits for the files before returning.
    Returns the directory on rank 0, ``None`` elsewhere. Without a process group it is ``modapt.save``.
    """
    model = unwrap(model)
    if not is_distributed():
        return _save(model, directory, **kwargs)
    result = None
    if dist.get_rank() == 0:
        result = _save(model, directory, **kwargs)
    else:
        # mirror save's gathers exactly (same tensors, same order), without writing anything
        for tensor in adapter_state_dict(model).values():
            full_tensor(tensor)
        fingerprint(state_of(model).base_keys.values(), base_weight_getter(model))
    dist.barrier()
    return result


def rank_shard(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """Indices of this rank's contiguous part of ``n`` examples (equal parts; the remainder dropped).

    Equal parts keep the per-rank batch sizes equal, so DDP's gradient average is the gradient
    of the mean loss over the global batch.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    per = n // world
    return range(rank_ * per, (rank_ + 1) * per)
