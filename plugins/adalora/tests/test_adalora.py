"""AdaLoRA on its own: the schedule by hand, the update's formulas, grouping, state, user errors."""

from __future__ import annotations

import modapt
import pytest
import torch
from modapt.testing import tiny_inputs, tiny_llama
from modapt_adalora import AdaLoraOptions, allocators_of, budget_schedule, ranks
from modapt.shared import SHARED_ATTR
from modapt_adalora.allocator import adalora_layers


def recipe(**options):
    opts = {"init_r": 4, "target_r": 2, "total_step": 10}
    opts.update(options)
    targets = opts.pop("targets", ["q_proj", "v_proj"])
    return {"adapter": [{"method": "adalora", "targets": targets, **opts}]}


def test_budget_schedule_by_hand():
    opts = AdaLoraOptions(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2)
    # b0 = 24, bT = 8 over four layers; shrinking between t = 2 and t = 9 = 12 - 3:
    # b(t) = floor(16 · (1 - (t - 2)/7)³ + 8)
    expected = {0: (24, False), 2: (24, False),
                3: (18, False),   # 16·(6/7)³ + 8 = 18.08
                4: (13, True),    # 16·(5/7)³ + 8 = 13.83; even step: reallocate (deltaT = 2)
                8: (8, True),     # 16·(1/7)³ + 8 = 8.05
                9: (8, False),    # t = T - tfinal: the target (model hook forces the final mask)
                10: (8, True), 12: (8, True)}
    for step, want in expected.items():
        assert budget_schedule(step, 24, 8, opts) == want, step


def test_update_formulas(registry):
    model = modapt.apply(tiny_llama(), recipe(lora_alpha=6.0), registry=registry)
    host = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        host.lora_E.normal_()
    p, lam, q = host.lora_B.detach().double(), host.lora_E.detach().double().view(-1), host.lora_A.detach().double()
    c = 6.0 / 4.00001
    delta = p @ torch.diag(lam) @ q * c                                  # [out, in]
    torch.testing.assert_close(host.update.delta_weight(torch.zeros(64, 64)).double(), delta, rtol=1e-5, atol=1e-7)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(host.update.forward(x, None, host.base_layer).double(), x.double() @ delta.T,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(host.update.frobenius_sq(None).double(), (delta ** 2).sum(), rtol=1e-5, atol=0)
    left, right = host.update.factors()
    assert left.shape == (64, 4) and right.shape == (4, 64)


def test_identity_at_init_and_initial_state(registry):
    model = modapt.apply(tiny_llama(), recipe(), registry=registry)
    for host in adalora_layers(model).values():
        assert torch.equal(host.lora_E, torch.zeros(4, 1)) and host.rank_pattern.all()
        assert 0.01 < host.lora_A.std() < 0.03 and 0.01 < host.lora_B.std() < 0.03   # N(0, 0.02²) as PEFT
    assert set(ranks(model).values()) == {4}
    assert set(modapt.adapter_state_dict(model)) >= {"model.layers.0.self_attn.q_proj.rank_pattern"}


def test_entries_with_different_schedules_get_separate_budgets(registry):
    rec = {"adapter": [
        {"method": "adalora", "targets": ["q_proj"], "init_r": 4, "target_r": 1, "total_step": 4},
        {"method": "adalora", "targets": ["v_proj"], "init_r": 6, "target_r": 3, "total_step": 4},
    ]}
    model = modapt.apply(tiny_llama(), rec, registry=registry)
    allocators = allocators_of(model)
    assert sorted((a.init_budget, a.target_budget) for a in allocators) == [(8, 2), (12, 6)]
    assert all(a is b for a, b in zip(allocators_of(model), allocators))  # kept on the model between calls
    assert len(model.modapt_shared) == 2  # one shared state per schedule
    params = list(modapt.trainable_parameters(model).values())
    for step in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        modapt.after_optimizer_step(model, step, registry=registry)
    got = ranks(model)
    assert sum(v for k, v in got.items() if "q_proj" in k) == 2
    assert sum(v for k, v in got.items() if "v_proj" in k) == 6


def test_state_is_rebuilt_for_a_new_adapter(registry):
    model = modapt.apply(tiny_llama(), recipe(), registry=registry)
    first = allocators_of(model)
    modapt.remove(model)
    assert allocators_of(model) == [] and SHARED_ATTR not in model._modules
    modapt.apply(model, recipe(), registry=registry)
    assert allocators_of(model)[0] is not first[0]


def test_hooks_ignore_models_without_adalora(registry):
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "targets": ["q_proj"]}]}, registry=registry)
    assert modapt.regularization_loss(model, registry=registry).item() == 0.0
    modapt.after_optimizer_step(model, 0, registry=registry)
    modapt.after_optimizer_step(tiny_llama(), 0, registry=registry)   # not adapted at all


def test_hook_without_gradients_says_where_to_call_it(registry):
    model = modapt.apply(tiny_llama(), recipe(), registry=registry)
    with pytest.raises(modapt.ModaptError, match="before optimizer.zero_grad"):
        modapt.after_optimizer_step(model, 0, registry=registry)


def test_hook_refuses_merged_layers(registry):
    model = modapt.apply(tiny_llama(), recipe(), registry=registry)
    modapt.merge(model, unload=False)
    with pytest.raises(modapt.ModaptError, match="merged layers"):
        modapt.after_optimizer_step(model, 0, registry=registry)


def test_final_allocation_without_scores_is_a_clear_error(registry):
    model = modapt.apply(tiny_llama(), recipe(tfinal=2), registry=registry)
    with pytest.raises(modapt.ModaptError, match="needs importance scores"):
        modapt.after_optimizer_step(model, 8, registry=registry)


@pytest.mark.parametrize("options, message", [
    ({"total_step": None}, "total_step"),
    ({"target_r": 4}, "target_r"),
    ({"tinit": 8, "tfinal": 2}, "tinit"),
    ({"beta1": 1.0}, "beta1"),
    ({"init_r": 100}, "init_r = 100 exceeds"),
    ({"rank": 4}, "rank"),
    ({"targets": ["embed_tokens"]}, "embed_tokens"),
])
def test_user_mistakes_name_the_key(registry, options, message):
    rec = recipe(**options)
    rec["adapter"][0] = {k: v for k, v in rec["adapter"][0].items() if v is not None}
    with pytest.raises(modapt.ModaptError, match=message):
        modapt.apply(tiny_llama(), rec, registry=registry)


def test_training_loop_prunes_to_target_and_learns(registry):
    model = modapt.apply(tiny_llama(), recipe(init_r=4, target_r=2, total_step=12, tinit=2, tfinal=3), registry=registry)
    inputs = tiny_inputs()
    opt = torch.optim.AdamW(modapt.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    losses = []
    for step in range(12):
        task = model(**inputs, labels=inputs["input_ids"]).loss
        (task + modapt.regularization_loss(model, registry=registry)).backward()
        modapt.before_optimizer_step(model, step, registry=registry)
        opt.step()
        modapt.after_optimizer_step(model, step, registry=registry)
        opt.zero_grad()
        losses.append(task.item())
    assert losses[-1] < losses[0]
    assert sum(ranks(model).values()) == 2 * 4


def test_batched_scores_and_masks_equal_the_per_layer_ones(registry):
    """The allocator's batched path (stacked means per shape group, multi-tensor masking) gives
    the per-layer scores bit for bit, in the layers' order, and masks as masked_fill would."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = modapt.apply(tiny_llama(), recipe(targets=targets, init_r=4, target_r=2), registry=registry)
    (allocator,) = allocators_of(model)
    gen = torch.Generator().manual_seed(0)
    for param in modapt.trainable_parameters(model).values():
        with torch.no_grad():
            param.normal_(generator=gen)
        param.grad = torch.randn(param.shape, generator=gen)
    allocator.update_scores()
    per_layer = allocator.triplet_scores()
    shapes = {tuple(h.lora_B.shape) for h in allocator.hosts.values()}
    assert len(shapes) > 1, "one shape group only: the reordering would not be exercised"
    assert torch.equal(allocator._score_matrix(), torch.stack([per_layer[p] for p in allocator.hosts]))
    before = {p: h.lora_E.detach().clone() for p, h in allocator.hosts.items()}
    allocator.mask_to_budget(allocator.init_budget - 10)
    threshold = torch.cat(list(per_layer.values())).kthvalue(10).values
    for path, host in allocator.hosts.items():
        keep = per_layer[path] > threshold
        assert torch.equal(host.rank_pattern, keep), path
        want = before[path].masked_fill(~keep.view(-1, 1), 0.0)
        assert torch.equal(host.lora_E, want) and not torch.signbit(host.lora_E[~keep]).any(), path
    assert sum(ranks(model).values()) == allocator.init_budget - 10


def test_scores_live_on_the_models_shared_state(registry, tmp_path):
    model = modapt.apply(tiny_llama(), recipe(), registry=registry)
    for p in modapt.trainable_parameters(model).values():
        p.grad = torch.randn_like(p)
    modapt.after_optimizer_step(model, 0, registry=registry)
    (shared,) = model.modapt_shared.values()
    scored = dict(shared.named_buffers())
    params = modapt.trainable_parameters(model)
    assert len(scored) == 2 * len(params)
    beta1 = allocators_of(model)[0].options.beta1
    for name, p in params.items():  # after one step from 0: Ī = (1 - β1)|θ ⊙ g|
        want = (p * p.grad).abs() * (1 - beta1)
        torch.testing.assert_close(scored["sensitivity/" + name.replace(".", "/")], want, rtol=1e-6, atol=0)
    assert not any("modapt_shared" in k for k in model.state_dict())  # training state, not adapter state
    model.to(torch.float64)  # moved (here: cast) with the model, and still the allocator's
    assert all(t.dtype == torch.float64 for t in allocators_of(model)[0].sensitivity)
