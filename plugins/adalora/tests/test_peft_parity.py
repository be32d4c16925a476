"""AdaLoRA against PEFT 0.21 (an independent implementation) on the same weights and gradients.

Forward, regulariser, and a scripted run of optimizer steps with given gradients: after every
step the importance scores, Λ (masked in place) and the rank pattern must equal PEFT's.
"""

from __future__ import annotations

import modapt
import modapt_adalora
import pytest
import torch
from modapt.testing import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from modapt_adalora.allocator import adalora_layers, allocators_of

peft = pytest.importorskip("peft")

FACTORIES = {"llama": (tiny_llama, "causal-lm", ["q_proj", "v_proj"]),
             "gpt2": (tiny_gpt2, "causal-lm", ["c_attn"]),
             "bert": (tiny_bert, "sequence-classification", ["query", "value"])}


def make_pair(family, registry, **options):
    """(ours, PEFT's) on the same base; our random P, Λ, Q copied into PEFT's layers."""
    factory, task, targets = FACTORIES[family]
    opts = dict(init_r=6, target_r=2, lora_alpha=16.0, total_step=12, **options)
    ours = modapt.apply(factory(task=task), {"adapter": [{"method": "adalora", "targets": targets, **opts}]},
                        registry=registry)
    peft_opts = {("lora_dropout" if k == "dropout" else k): v for k, v in opts.items()}
    theirs = peft.get_peft_model(factory(task=task), peft.AdaLoraConfig(target_modules=targets, **peft_opts))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for path, host in adalora_layers(ours).items():
            layer = theirs.base_model.model.get_submodule(path)
            for key in ("lora_A", "lora_E", "lora_B"):
                param = getattr(host, key)
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                getattr(layer, key)["default"].copy_(param)
    return ours, theirs


def peft_params(theirs):
    """``<path>.lora_X`` -> PEFT's parameter (adapter name dropped), the key our allocator uses."""
    return {n.removesuffix(".default"): p for n, p in theirs.base_model.model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_forward_and_merge_match_peft(family, registry):
    ours, theirs = make_pair(family, registry)
    inputs = tiny_inputs()
    with torch.no_grad():
        got, want = ours(**inputs).logits, theirs(**inputs).logits
        base = FACTORIES[family][0](task=FACTORIES[family][1])(**inputs).logits
        assert (want - base).abs().max() > 0.01 * base.abs().max(), "the adapter does not change the output: the test would be vacuous"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        modapt.merge(ours)
        merged_theirs = theirs.merge_and_unload()
    ours_sd, theirs_sd = ours.state_dict(), merged_theirs.state_dict()
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=1e-5, atol=1e-6)


def test_regulariser_matches_peft(registry):
    ours, theirs = make_pair("llama", registry, orth_reg_weight=0.3)
    inputs = tiny_inputs()
    labels = inputs["input_ids"]
    reg = modapt.regularization_loss(ours, registry=registry)
    # PEFT adds orth_reg_weight · regulariser to the loss inside forward
    with_reg = theirs.base_model(**inputs, labels=labels).loss  # AdaLoraModel.forward adds it
    theirs.peft_config["default"].orth_reg_weight = 0.0
    without_reg = theirs.base_model(**inputs, labels=labels).loss
    assert reg.item() > 0.1
    torch.testing.assert_close(reg, (with_reg - without_reg).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(**inputs, labels=labels).loss.detach(), without_reg.detach(), rtol=1e-6, atol=1e-6)
    # the formula written out: mean over the 4 layers' Q and P of ‖QQᵀ - I‖_F, ‖PᵀP - I‖_F
    norms = []
    for host in adalora_layers(ours).values():
        q, p = host.lora_A.detach().double(), host.lora_B.detach().double()
        norms += [((q @ q.T - torch.eye(6, dtype=torch.float64)) ** 2).sum().sqrt(),
                  ((p.T @ p - torch.eye(6, dtype=torch.float64)) ** 2).sum().sqrt()]
    assert len(norms) == 8
    torch.testing.assert_close(reg.double(), 0.3 * torch.stack(norms).mean(), rtol=1e-5, atol=0)


def test_regulariser_has_gradients_and_zero_weight_adds_nothing(registry):
    ours, _ = make_pair("llama", registry, orth_reg_weight=0.5)
    modapt.regularization_loss(ours, registry=registry).backward()
    assert all(host.lora_A.grad.abs().sum() > 0 and host.lora_B.grad.abs().sum() > 0
               for host in adalora_layers(ours).values())
    silent, _ = make_pair("llama", registry, orth_reg_weight=0.0)
    assert modapt.regularization_loss(silent, registry=registry).item() == 0.0


SCHEDULE = {"tinit": 2, "tfinal": 3, "deltaT": 2, "beta1": 0.8, "beta2": 0.9}   # total_step 12: the final mask at step 9


def scripted_run(ours, theirs, registry, steps, on_step=None):
    """Identical SGD steps with given gradients, then our hook and PEFT's update_and_allocate."""
    our_params = {f"{path}.{k}": getattr(host, k) for path, host in adalora_layers(ours).items()
                  for k in ("lora_A", "lora_E", "lora_B")}
    their_params = peft_params(theirs)
    assert our_params.keys() == their_params.keys()
    opt_ours = torch.optim.SGD(list(our_params.values()), lr=0.05)
    opt_theirs = torch.optim.SGD(list(their_params.values()), lr=0.05)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for name in sorted(our_params):
            grad = torch.randn(our_params[name].shape, generator=gen)
            our_params[name].grad = grad.clone()
            their_params[name].grad = grad.clone()
        opt_ours.step()
        opt_theirs.step()
        modapt.after_optimizer_step(ours, step, registry=registry)
        theirs.base_model.update_and_allocate(step)
        if on_step:
            on_step(step, our_params, their_params)
        opt_ours.zero_grad()
        opt_theirs.zero_grad()


def test_scripted_steps_give_peft_scores_masks_and_ranks(registry):
    ours, theirs = make_pair("llama", registry, **SCHEDULE)
    allocator = allocators_of(ours)[0]
    rank_history = []

    def check(step, our_params, their_params):
        their_alloc = theirs.base_model.rankallocator
        if step < 9:  # scores exist until the final allocation resets them (both sides)
            for name, (sens, unc) in allocator.scores().items():
                assert torch.equal(sens, their_alloc.exp_avg_ipt[f"{name}.default"]), f"step {step}: {name}"
                assert torch.equal(unc, their_alloc.exp_avg_unc[f"{name}.default"]), f"step {step}: {name}"
        else:
            assert allocator.scores() == {} and their_alloc.exp_avg_ipt == {}
        for name in our_params:
            assert torch.equal(our_params[name], their_params[name]), f"step {step}: {name} differs"
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern is not None:
            for path, host in adalora_layers(ours).items():
                assert host.rank_pattern.tolist() == pattern[f"{path}.lora_E.default"], f"step {step}: {path}"
        rank_history.append(modapt_adalora.ranks(ours))

    scripted_run(ours, theirs, registry, steps=13, on_step=check)
    # the scripted run went through every phase: warm-up, shrinking budget, final fixed pattern
    totals = [sum(r.values()) for r in rank_history]
    assert totals[:4] == [24, 24, 24, 24]          # warm-up (steps 0-2), step 3 is odd: no reallocation
    assert totals[4] < 24 and totals[-1] == 8      # pruned to target_r · 4 layers
    assert len(set(rank_history[-1].values())) > 1, "all layers got the same rank: allocation not exercised"
    assert allocator.budget == 8
    for host in adalora_layers(ours).values():     # pruned triplets have Λ = 0 after the final steps
        assert (host.lora_E[~host.rank_pattern] == 0).all()
        assert (host.lora_E[host.rank_pattern] != 0).all()


def test_saved_adapter_reloads_to_the_same_merged_weights(registry, tmp_path):
    ours, theirs = make_pair("llama", registry, **SCHEDULE)
    scripted_run(ours, theirs, registry, steps=11)
    modapt.save(ours, tmp_path / "ada", registry=registry)
    fresh = modapt.load(tiny_llama(), tmp_path / "ada", registry=registry)
    assert modapt_adalora.ranks(fresh) == modapt_adalora.ranks(ours) and sum(modapt_adalora.ranks(ours).values()) == 8
    # the reloaded pattern drives the final phase: revived pruned values of Λ are zeroed again
    before = {path: host.lora_E.detach().clone() for path, host in adalora_layers(fresh).items()}
    with torch.no_grad():
        for host in adalora_layers(fresh).values():
            host.lora_E.masked_fill_(~host.rank_pattern.view(-1, 1), 1.0)
            for k in ("lora_A", "lora_E", "lora_B"):
                getattr(host, k).grad = torch.zeros_like(getattr(host, k))
    modapt.after_optimizer_step(fresh, 11, registry=registry)
    for path, host in adalora_layers(fresh).items():
        assert torch.equal(host.lora_E, before[path])
    merged_ours = modapt.merge(ours).state_dict()
    merged_fresh = modapt.merge(fresh).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    for key in merged_ours:
        assert torch.equal(merged_ours[key], merged_fresh[key]), key
        torch.testing.assert_close(merged_ours[key], merged_theirs[key], rtol=1e-5, atol=1e-6)


def test_peft_adapter_files_both_ways(registry, tmp_path):
    """PEFT's save_pretrained (pruned triplets dropped, rank_pattern in the config) <-> modapt, via modapt-export."""
    peft_format = pytest.importorskip("modapt_export.peft_format")
    ours, theirs = make_pair("llama", registry, **SCHEDULE)
    scripted_run(ours, theirs, registry, steps=11)
    theirs.save_pretrained(tmp_path / "peft")
    from_peft = peft_format.load_peft(tiny_llama(), tmp_path / "peft", registry=registry)
    assert modapt_adalora.ranks(from_peft) == modapt_adalora.ranks(ours)
    peft_format.save_peft(ours, tmp_path / "back", registry=registry)
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "back")
    want = modapt.merge(ours).state_dict()
    got_modapt = modapt.merge(from_peft).state_dict()
    got_peft = back.merge_and_unload().state_dict()
    for key in want:
        assert torch.equal(got_modapt[key], want[key]), key
        torch.testing.assert_close(got_peft[key], want[key], rtol=1e-5, atol=1e-6)
