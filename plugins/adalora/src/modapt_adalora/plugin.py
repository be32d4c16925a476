"""The ``adalora`` method and the two training hooks that drive it (entry point ``adalora``)."""

from __future__ import annotations

import modapt
from modapt import Capabilities, Lazy, Method, PeftFormat

from .options import SCHEDULE_KEYS, AdaLoraOptions

#: How this method's tensors and options map onto PEFT 0.21's AdaLoRA (for modapt-export).
#: Tensors: modapt ``<path>.<key>`` <-> PEFT file ``base_model.model.<path>.<key>`` (no adapter
#: name in PEFT's file). PEFT keeps the rank pattern in ``adapter_config.json`` (``rank_pattern``,
#: ``{"<path>.lora_E": [bool] * init_r}``) and drops the pruned triplets from the saved tensors;
#: modapt keeps full ``init_r`` tensors and the pattern as the ``rank_pattern`` buffer.
PEFT_FORMAT = PeftFormat(
    peft_type="ADALORA",
    keys={"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"},
    options={**{k: k for k in SCHEDULE_KEYS}, "lora_alpha": "lora_alpha", "dropout": "lora_dropout"},
    rank_pattern="rank_pattern",
)

ADALORA = Method(
    name="adalora",
    example={"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 10, "targets": ["q_proj", "v_proj"]},
    family="update",
    options=AdaLoraOptions,
    build=Lazy("modapt_adalora.svd_update:AdaLora"),
    own_keys=("lora_A", "lora_E", "lora_B"),
    capabilities=Capabilities(
        mergeable=True,
        composes_with=frozenset({"reparam", "attention", "module"}),
        layer_kinds=frozenset({"linear", "conv1d"}),
        cheap_norm=True,
    ),
    description="AdaLoRA: ΔW = P Λ Q · lora_alpha/init_r with an adaptive rank budget (Zhang et al., 2023)",
    peft=PEFT_FORMAT,
)


@modapt.hookimpl
def modapt_register_methods(register):
    register(ADALORA)


@modapt.hookimpl
def modapt_regularization_loss(model):
    """orth_reg_weight · mean orthogonality residual, per schedule group; None without AdaLoRA layers."""
    from .allocator import allocators_of  # torch: imported when a model trains, not at registry load
    from .orthogonality import orthogonality

    terms = [a.options.orth_reg_weight * orthogonality(a.hosts.values())
             for a in allocators_of(model) if a.options.orth_reg_weight > 0]
    if not terms:
        return None
    return sum(terms[1:], terms[0])


@modapt.hookimpl
def modapt_after_optimizer_step(model, step):
    """Importance scores and rank allocation (PEFT's ``update_and_allocate(step)``)."""
    from .allocator import allocators_of

    for allocator in allocators_of(model):
        allocator.step(step)


@modapt.hookimpl
def modapt_describe():
    return {"description": "AdaLoRA: SVD-form updates whose ranks are pruned to a budget during training"}


@modapt.hookimpl
def modapt_training_state(model):
    """The importance averages and budget (module ``training_state``), for checkpoints."""
    from .training_state import training_state

    return training_state(model)


@modapt.hookimpl
def modapt_load_training_state(model, states):
    from .training_state import load_training_state

    return load_training_state(model, states)
