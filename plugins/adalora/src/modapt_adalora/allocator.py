"""The rank allocator: budget schedule, importance scores, and the masking of Λ.

One :class:`RankAllocator` holds the global state of the AdaLoRA layers of one model that
share a schedule (normally all of them). It lives in ``model.__dict__["modapt_adalora"]``,
built lazily by :func:`allocators_of` on the first hook call from ``modapt.state_of(model)``
and rebuilt if the adapted layers change (``remove`` / a new ``apply``). What must survive a
save is on the layers, not here: each host's ``rank_pattern`` buffer and its Λ, zeroed where
pruned. The importance scores are training state like optimizer moments, and, as in PEFT,
they are not saved.

Numerics and schedule follow PEFT 0.21's ``RankAllocator`` and ``update_and_allocate``; a
step ``t`` here is PEFT's ``global_step``: the 0-based index of the optimizer step just taken.
"""

from __future__ import annotations

import modapt
import torch
from modapt import StateError
from torch import nn

from .options import AdaLoraOptions
from .sharding import full, laid_out_like
from .svd_update import AdaLora

CACHE_ATTR = "modapt_adalora"
#: the order in which a layer's parameters are scored (any order gives the same result)
PARAM_KEYS = ("lora_A", "lora_E", "lora_B")


def budget_schedule(step: int, init_budget: int, target_budget: int, options: AdaLoraOptions) -> tuple[int, bool]:
    """(total rank budget, whether to reallocate) after optimizer step ``step``.

    ``step <= tinit``: the full budget ``init_budget`` (= Σ init_r), no pruning.
    ``step > total_step - tfinal``: ``target_budget`` (= target_r · layers), the pattern fixed.
    In between the budget shrinks cubically, b(t) = ⌊(b0 - bT)·(1 - (t - tinit)/(T - tfinal - tinit))³ + bT⌋,
    and triplets are reallocated every ``deltaT`` steps (when ``t % deltaT == 0``).
    """
    tinit, tfinal, total = options.tinit, options.tfinal, options.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((init_budget - target_budget) * (remaining ** 3) + target_budget)
    return budget, step % options.deltaT == 0


class RankAllocator:
    """Budget and importance scores of the AdaLoRA layers ``hosts`` (path -> host) of one schedule.

    Per parameter θ (each of P, Λ, Q) with gradient g, after every optimizer step while the
    budget shrinks (AdaLoRA paper eqs. 8-10, with PEFT's choices)::

        I     = |θ ⊙ g|                                   (sensitivity, elementwise)
        Ī     ← β1 Ī + (1 - β1) I                         (``sensitivity``)
        Ū     ← β2 Ū + (1 - β2) |I - Ī|                   (``uncertainty``, with the new Ī)
        s(θ)  = Ī ⊙ Ū

    and the score of triplet i of a layer is s(Λ)[i] + mean_j s(Q)[i, j] + mean_j s(P)[j, i].
    """

    def __init__(self, options: AdaLoraOptions, hosts: dict[str, nn.Module]):
        self.options = options
        self.hosts = dict(hosts)
        self.init_budget = sum(h.update.init_r for h in self.hosts.values())
        self.target_budget = options.target_r * len(self.hosts)
        self.budget = self.init_budget
        self.sensitivity: list[torch.Tensor] = []  # PEFT's exp_avg_ipt, in the order of _named_params()
        self.uncertainty: list[torch.Tensor] = []  # PEFT's exp_avg_unc

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{path}.{key}", getattr(host, key)) for path, host in self.hosts.items() for key in PARAM_KEYS]

    def _check_unmerged(self) -> None:
        merged = [path for path, host in self.hosts.items() if host.merged]
        if merged:
            raise StateError(f"AdaLoRA cannot allocate ranks on merged layers ('{merged[0]}'); modapt.unmerge first")

    # ------------------------------------------------------------------ the step
    def step(self, step: int) -> None:
        """What PEFT's ``update_and_allocate(step)`` does, for these layers."""
        self._check_unmerged()
        boundary = self.options.total_step - self.options.tfinal
        if step < boundary:
            self.update_scores()
            budget, reallocate = budget_schedule(step, self.init_budget, self.target_budget, self.options)
            if reallocate:
                self.mask_to_budget(budget)
        elif step == boundary:
            if not self.sensitivity:
                raise StateError(
                    f"AdaLoRA's final allocation (step {step} = total_step - tfinal) needs importance scores, and none "
                    "were collected: call modapt.after_optimizer_step at the steps before it (scores are not saved)")
            budget, _ = budget_schedule(step, self.init_budget, self.target_budget, self.options)
            self.mask_to_budget(budget)
            self.reset_scores()
        else:
            self.apply_rank_pattern()

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold this step's |θ ⊙ g| into the two exponential averages (needs the gradients)."""
        named = self._named_params()
        missing = [name for name, p in named if p.grad is None]
        if missing:
            raise StateError(
                f"AdaLoRA needs the gradients of the step just taken, but '{missing[0]}' has none: call "
                "modapt.after_optimizer_step(model, step) after optimizer.step() and before optimizer.zero_grad()")
        params = [p for _, p in named]
        grads = [p.grad for p in params]
        if not self.sensitivity:
            self.sensitivity = [torch.zeros_like(p) for p in params]
            self.uncertainty = [torch.zeros_like(p) for p in params]
        b1, b2 = self.options.beta1, self.options.beta2
        # one multi-tensor kernel per operation for all layers; each op rounds as PEFT's eager ops
        ipt = torch._foreach_abs(torch._foreach_mul(params, grads))
        self.sensitivity = torch._foreach_add(torch._foreach_mul(self.sensitivity, b1),
                                              torch._foreach_mul(ipt, 1 - b1))
        spread = torch._foreach_abs(torch._foreach_sub(ipt, self.sensitivity))
        self.uncertainty = torch._foreach_add(torch._foreach_mul(self.uncertainty, b2),
                                              torch._foreach_mul(spread, 1 - b2))

    def reset_scores(self) -> None:
        self.sensitivity, self.uncertainty = [], []

    def scores(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``"<path>.lora_A"`` -> (sensitivity Ī, uncertainty Ū), each shaped like the parameter."""
        names = [name for name, _ in self._named_params()]
        return {n: (s, u) for n, s, u in zip(names, self.sensitivity, self.uncertainty)}

    @torch.no_grad()
    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """path -> the score of each of its ``init_r`` triplets, [init_r]."""
        element = [full(s * u) for s, u in zip(self.sensitivity, self.uncertainty)]  # FSDP2: gathered
        out = {}
        for i, path in enumerate(self.hosts):
            q, lam, p = element[3 * i: 3 * i + 3]  # PARAM_KEYS order: lora_A (Q), lora_E (Λ), lora_B (P)
            out[path] = lam.view(-1) + (q.mean(dim=1) + p.mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` best triplets over all layers (ties at the threshold are all pruned).

        The threshold is the (Σ init_r - budget)-th smallest triplet score; a triplet at or below
        it has its Λ[i] set to 0 and ``rank_pattern[i] = False``.
        """
        scores = self.triplet_scores()
        device = next(iter(scores.values())).device
        pruned_count = self.init_budget - budget
        if pruned_count > 0:
            # a 0-dim tensor, not .item(): the comparison below is the same, without a device sync
            threshold = torch.kthvalue(torch.cat([s.to(device) for s in scores.values()]), k=pruned_count)[0]
        else:  # nothing to prune (kthvalue has no 0-th value)
            threshold = torch.tensor(-float("inf"), device=device)
        for path, host in self.hosts.items():
            pruned = scores[path] <= threshold.to(scores[path].device)
            host.lora_E.masked_fill_(laid_out_like(pruned.view(-1, 1), host.lora_E), 0.0)
            host.rank_pattern.copy_(~pruned)
        self.budget = budget

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        """Zero Λ where the fixed ``rank_pattern`` is False (the final phase, after each step)."""
        for host in self.hosts.values():
            host.lora_E.masked_fill_(laid_out_like(~host.rank_pattern.view(-1, 1), host.lora_E), 0.0)


def adalora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """path -> host for every layer whose update is AdaLoRA (under any reparam), sorted by path."""
    if not modapt.is_adapted(model):
        return {}
    state = modapt.state_of(model)
    return {path: host for path, host in sorted(state.layers.items()) if isinstance(host.update, AdaLora)}


def allocators_of(model: nn.Module) -> list[RankAllocator]:
    """The model's allocators, one per distinct schedule (see :data:`~.options.SCHEDULE_KEYS`).

    Built on first use and kept in ``model.__dict__["modapt_adalora"]`` with the adapter state
    they were built for; rebuilt (scores lost) when the adapted layers are no longer the same.
    """
    hosts = adalora_layers(model)
    if not hosts:
        model.__dict__.pop(CACHE_ATTR, None)
        return []
    state = modapt.state_of(model)
    identity = tuple((path, id(host)) for path, host in hosts.items())
    cached = model.__dict__.get(CACHE_ATTR)
    if cached is not None and cached[0] is state and cached[1] == identity:
        return cached[2]
    groups: dict[tuple, dict[str, nn.Module]] = {}
    for path, host in hosts.items():
        groups.setdefault(host.update.options.schedule_key(), {})[path] = host
    allocators = [RankAllocator(next(iter(g.values())).update.options, g) for g in groups.values()]
    model.__dict__[CACHE_ATTR] = (state, identity, allocators)
    return allocators


def ranks(model: nn.Module) -> dict[str, int]:
    """path -> the rank each AdaLoRA layer has after the last allocation (``init_r`` before any)."""
    return {path: int(host.rank_pattern.sum()) for path, host in adalora_layers(model).items()}
