"""The rank allocator: budget schedule, importance scores, and the masking of Λ.

One :class:`RankAllocator` drives the AdaLoRA layers of one model that share a schedule
(normally all of them). Its state across steps (importance averages, budget) lives in the
schedule's :class:`~.budget_state.BudgetState`, registered on the model through
:mod:`modapt.shared` at apply time, so it moves with the model; the allocator itself is built
lazily by :func:`allocators_of` from ``modapt.state_of(model)`` and rebuilt (scores cleared) if
the adapted layers change. What must survive a save is on the layers: each host's
``rank_pattern`` buffer and its Λ, zeroed where pruned. The importance scores are training
state like optimizer moments: checkpoints keep them (:mod:`.training_state`, through
:func:`modapt.training.save_training_state`), adapter folders do not (as in PEFT).

Numerics and schedule follow PEFT 0.21's ``RankAllocator`` and ``update_and_allocate``; a
step ``t`` here is PEFT's ``global_step``: the 0-based index of the optimizer step just taken.
"""

from __future__ import annotations

import modapt
import torch
from modapt import StateError
from torch import nn

from .budget_state import BudgetState
from .options import AdaLoraOptions
from .sharding import DTensor, full, laid_out_like
from .svd_update import AdaLora

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

    def __init__(self, options: AdaLoraOptions, hosts: dict[str, nn.Module], state: BudgetState | None = None):
        self.options = options
        self.hosts = dict(hosts)
        self.state = state if state is not None else BudgetState()
        self.state.clear()
        self.init_budget = sum(h.update.init_r for h in self.hosts.values())
        self.target_budget = options.target_r * len(self.hosts)
        self.state.budget = self.init_budget
        self._names = [name for name, _ in self._named_params()]

    # the state across steps, kept on the model's shared BudgetState
    @property
    def budget(self) -> int:
        return self.state.budget

    @budget.setter
    def budget(self, value: int) -> None:
        self.state.budget = value

    @property
    def sensitivity(self) -> list[torch.Tensor]:
        """PEFT's ``exp_avg_ipt``, in the order of ``_named_params()`` ([] before any score)."""
        return self.state.scores("sensitivity")

    @sensitivity.setter
    def sensitivity(self, tensors: list[torch.Tensor]) -> None:
        self.state.set_scores("sensitivity", self._names, tensors)

    @property
    def uncertainty(self) -> list[torch.Tensor]:
        """PEFT's ``exp_avg_unc``, in the order of ``_named_params()``."""
        return self.state.scores("uncertainty")

    @uncertainty.setter
    def uncertainty(self, tensors: list[torch.Tensor]) -> None:
        self.state.set_scores("uncertainty", self._names, tensors)

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

    def _sharded(self) -> bool:
        """Whether any Λ is an FSDP2 shard (then the per-layer, gathering path runs)."""
        return DTensor is not None and any(isinstance(h.lora_E, DTensor) for h in self.hosts.values())

    def _layout(self):
        """For the batched scores: per kind (Q, P) the groups of equally shaped layers, as
        (indices into the hosts' order, LongTensor of them), and the permutation that puts the
        groups' concatenation back in the hosts' order. Built once (the hosts are fixed)."""
        if getattr(self, "_layout_cache", None) is None:
            hosts = list(self.hosts.values())
            device = hosts[0].lora_E.device
            kinds = []
            for key in ("lora_A", "lora_B"):
                groups: dict[tuple, list[int]] = {}
                for i, host in enumerate(hosts):
                    groups.setdefault(tuple(getattr(host, key).shape), []).append(i)
                order = [i for idx in groups.values() for i in idx]
                inverse = torch.empty(len(order), dtype=torch.long)
                inverse[torch.tensor(order)] = torch.arange(len(order))
                kinds.append((list(groups.values()), inverse.to(device)))
            self._layout_cache = kinds
        return self._layout_cache

    @torch.no_grad()
    def _score_matrix(self) -> torch.Tensor:
        """The triplet scores of all layers, [layers, init_r], in the hosts' order.

        A fixed number of kernels whatever the number of layers: s = Ī ⊙ Ū for every parameter
        in one multi-tensor op, then per group of equally shaped P (or Q) one stack and one mean,
        one reordering per kind, two adds. Each score is computed as in PEFT, element for element.
        """
        if self._sharded():
            return torch.stack(list(self.triplet_scores().values()))
        element = torch._foreach_mul(self.sensitivity, self.uncertainty)  # PARAM_KEYS order: Q, Λ, P per layer
        count = len(self.hosts)
        lam = torch.stack(element[1::3]).view(count, -1)  # [L, r]
        means = []
        for (groups, inverse), offset, dim in zip(self._layout(), (0, 2), (2, 1)):
            # Q [r, in]: mean over in (dim 2 of the stack); P [out, r]: mean over out (dim 1)
            parts = [torch.stack([element[3 * i + offset] for i in idx]).mean(dim=dim) for idx in groups]
            means.append(torch.cat(parts).index_select(0, inverse) if len(parts) > 1 else parts[0])
        return lam + (means[0] + means[1])

    @torch.no_grad()
    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """path -> the score of each of its ``init_r`` triplets, [init_r] (one layer at a time;
        :meth:`mask_to_budget` uses the batched form)."""
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
        scores = self._score_matrix()  # [L, r]
        pruned_count = self.init_budget - budget
        if pruned_count > 0:
            # a 0-dim tensor, not .item(): the comparison below is the same, without a device sync
            threshold = torch.kthvalue(scores.view(-1), k=pruned_count)[0]
            keep = (scores <= threshold).logical_not_()  # not "> threshold": a NaN score is kept, as in PEFT
        else:  # nothing to prune (kthvalue has no 0-th value)
            keep = torch.ones_like(scores, dtype=torch.bool)
        self._apply_keep(keep)
        self.budget = budget

    @torch.no_grad()
    def apply_rank_pattern(self) -> None:
        """Zero Λ where the fixed ``rank_pattern`` is False (the final phase, after each step)."""
        if self._sharded():
            for host in self.hosts.values():
                host.lora_E.masked_fill_(laid_out_like(~host.rank_pattern.view(-1, 1), host.lora_E), 0.0)
            return
        patterns = [host.rank_pattern for host in self.hosts.values()]
        self._zero_lambda(torch.stack(patterns))

    def _apply_keep(self, keep: torch.Tensor) -> None:
        """Λ[i] = 0 and ``rank_pattern[i] = False`` where ``keep`` [L, r] (bool) is False."""
        hosts = list(self.hosts.values())
        if self._sharded():
            for host, row in zip(hosts, keep):
                host.lora_E.masked_fill_(laid_out_like(~row.view(-1, 1), host.lora_E), 0.0)
                host.rank_pattern.copy_(row)
            return
        self._zero_lambda(keep)
        torch._foreach_copy_([host.rank_pattern for host in hosts], list(keep.to(hosts[0].rank_pattern.device)))

    def _zero_lambda(self, keep: torch.Tensor) -> None:
        """Λ ← 0 where ``keep`` [L, r] is False, for all layers in two multi-tensor kernels.

        Λ·1 = Λ and Λ·0 = ±0, and ±0 + 0.0 = +0.0: PEFT's ``masked_fill_(~keep, 0.0)`` bit for bit
        (for finite Λ; an infinite or NaN Λ, a diverged run, stays NaN here).
        """
        lambdas = [host.lora_E for host in self.hosts.values()]
        factors = keep.to(device=lambdas[0].device, dtype=lambdas[0].dtype).unsqueeze(-1)  # [L, r, 1]
        torch._foreach_mul_(lambdas, list(factors.unbind(0)))
        torch._foreach_add_(lambdas, 0.0)


def adalora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """path -> host for every layer whose update is AdaLoRA (under any reparam), sorted by path."""
    if not modapt.is_adapted(model):
        return {}
    state = modapt.state_of(model)
    return {path: host for path, host in sorted(state.layers.items()) if isinstance(host.update, AdaLora)}


def allocators_of(model: nn.Module) -> list[RankAllocator]:
    """The model's allocators, one per distinct schedule (see :data:`~.options.SCHEDULE_KEYS`).

    Each is kept on its schedule's shared :class:`~.budget_state.BudgetState` with the layers
    it was built for, and rebuilt (scores cleared) when the adapted layers are no longer the same.
    """
    groups: dict[int, dict[str, nn.Module]] = {}
    for path, host in adalora_layers(model).items():
        groups.setdefault(id(host.update.budget_state), {})[path] = host
    allocators = []
    for hosts in groups.values():
        state = next(iter(hosts.values())).update.budget_state
        identity = tuple((path, id(host)) for path, host in hosts.items())
        if state.allocator is None or state.allocator[0] != identity:
            options = next(iter(hosts.values())).update.options
            state.allocator = (identity, RankAllocator(options, hosts, state))
        allocators.append(state.allocator[1])
    return allocators


def ranks(model: nn.Module) -> dict[str, int]:
    """path -> the rank each AdaLoRA layer has after the last allocation (``init_r`` before any)."""
    return {path: int(host.rank_pattern.sum()) for path, host in adalora_layers(model).items()}

