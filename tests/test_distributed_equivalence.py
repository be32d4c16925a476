"""Every method under DDP and FSDP2 trains as one process on the concatenated batch would.

One ``torchrun --standalone --nproc-per-node 2`` launch (gloo, CPU) runs every case under both engines:
3 SGD steps of a tiny LLaMA (fp32) on its rank's half of a global batch, the loss being the
token mean over the *global* batch (sum over this rank's tokens / global token count · world,
since DDP and FSDP2 average gradients over ranks). Rank 0 writes the gathered adapter; the test
compares it with a single-process run on the whole batch (1e-5). The same file is the worker:
``python -m torch.distributed.run ... tests/test_distributed_equivalence.py --engines ddp,fsdp --out DIR lora ...``.

Also checked: AdaLoRA's importance scores and rank pattern are identical on every rank and equal
to the single-process ones (so the allocation sees gradients already averaged over ranks), LMAM
with sequence lengths that differ across ranks (each rank pads its own batch), and saving from
FSDP2 (gathered adapter, rank 0 writes) loaded and merged into a fresh model in this process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 3
LR = 0.5
LORA = {"method": "lora", "r": 4, "lora_alpha": 8.0}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
#: case -> (plugin modules to register besides LoRA: {method name: module}, recipe, data layout)
CASES = {
    "lora": ({}, {"adapter": [{**LORA, "targets": TARGETS}]}, "equal"),
    "lomap": ({"map": "modapt_map"}, {"adapter": [{"method": "map", "targets": TARGETS, "update": LORA}]}, "equal"),
    "dora": ({"dora": "modapt_dora"}, {"adapter": [{"method": "dora", "targets": TARGETS, "update": LORA}]},
             "equal"),
    "lorma": ({"lorma": "modapt_lorma"}, {"adapter": [{"method": "lorma", "targets": TARGETS, "r": 4,
                                                       "lora_alpha": 4.0, "inflation": "plus"}]}, "equal"),
    "lmam": ({"lmam": "modapt_lmam"}, {"adapter": [{**LORA, "targets": ["up_proj"]},
                                                   {"method": "lmam", "heads": 2, "r": 2, "n": 6, "init": "random"}]},
             "equal"),
    "lmam_ragged": ({"lmam": "modapt_lmam"}, {"adapter": [{"method": "lmam", "heads": 2, "r": 2, "n": 6,
                                                           "init": "random"}]}, "ragged"),
    "adalora": ({"adalora": "modapt_adalora"},
                {"adapter": [{"method": "adalora", "targets": TARGETS, "init_r": 6, "target_r": 2, "total_step": 6,
                              "tinit": 0, "tfinal": 1, "lora_alpha": 8.0}]}, "equal"),
    # shared state (modapt.shared): A and B registered once on the model, replicated by FSDP2
    "vera": ({"vera": "modapt_vera"}, {"adapter": [{"method": "vera", "targets": TARGETS, "r": 8,
                                                     "projection_prng_key": 5, "save_projection": True}]}, "equal"),
}
DISTRIBUTIONS = {"map": "modapt-map", "dora": "modapt-dora", "lorma": "modapt-lorma", "lmam": "modapt-lmam",
                 "adalora": "modapt-adalora", "vera": "modapt-vera"}


# ---------------------------------------------------------------------------- shared by worker and test
def registry_for(case: str):
    import modapt
    import modapt.lora
    from modapt.registry import Registry

    registry = Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    for name, module in CASES[case][0].items():
        registry.register_plugin(importlib.import_module(f"{module}.plugin"), name=name,
                                 distribution=DISTRIBUTIONS[name])
    return registry


def global_batch(layout: str) -> list[dict[str, torch.Tensor]]:
    """Per-rank batches of 2 sequences: ``equal`` all length 12; ``ragged`` rank 0 lengths (8, 10)
    padded to 10, rank 1 lengths (14, 11) padded to 14 (right padding, pad id 0)."""
    gen = torch.Generator().manual_seed(7)
    lengths = [[12, 12], [12, 12]] if layout == "equal" else [[8, 10], [14, 11]]
    out = []
    for per_rank in lengths:
        width = max(per_rank)
        ids = torch.zeros(len(per_rank), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(per_rank):
            ids[i, :n] = torch.randint(1, 128, (n,), generator=gen)
            mask[i, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def concatenated(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The batches of all ranks as one, right-padded to the longest."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
    return {k: torch.cat([pad(b[k]) for b in batches]) for k in batches[0]}


def token_count(batch) -> int:
    """Predicted tokens of a causal LM batch: valid positions with a valid next token."""
    return int((batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).sum())


def loss_of(model, batch, global_tokens: int, world: int) -> torch.Tensor:
    """Σ token cross-entropy of this batch / global tokens · world: ranks' gradients average to the
    gradient of the global token mean."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    valid = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten(),
                                           reduction="none").view_as(valid)
    return ce[valid].sum() / global_tokens * world


def train(case: str, engine: str, rank: int, world: int):
    """Adapt a tiny LLaMA with the case's recipe, wrap it, train 3 steps; returns (model, trained module)."""
    import modapt
    from modapt import distributed
    from modapt.registry import use_registry
    from modapt.testing import tiny_llama

    _, recipe, layout = CASES[case]
    batches = global_batch(layout)
    tokens = sum(token_count(b) for b in batches)
    batch = batches[rank] if world > 1 else concatenated(batches)
    registry = registry_for(case)
    with use_registry(registry):
        torch.manual_seed(0)
        model = modapt.apply(tiny_llama(seed=0), recipe)
        model.train()
        if engine == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        elif engine == "fsdp":
            wrapped = distributed.shard_decoder(model)
        else:
            wrapped = model
        optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
        for step in range(STEPS):
            loss = loss_of(wrapped, batch, tokens, world) + modapt.regularization_loss(model)
            loss.backward()
            modapt.before_optimizer_step(model, step)
            optimizer.step()
            modapt.after_optimizer_step(model, step)
            optimizer.zero_grad(set_to_none=True)
    return model, registry


def adalora_state(model) -> dict[str, torch.Tensor]:
    """Each AdaLoRA layer's rank pattern and triplet scores (full tensors)."""
    from modapt.persistence import full_tensor

    try:
        from modapt_adalora.allocator import adalora_layers, allocators_of
    except ImportError:
        return {}
    out = {f"{p}.rank_pattern": h.rank_pattern.clone() for p, h in adalora_layers(model).items()}
    for allocator in allocators_of(model):
        for name, (s, u) in allocator.scores().items():
            out[f"{name}.sensitivity"] = full_tensor(s).detach().clone()
            out[f"{name}.uncertainty"] = full_tensor(u).detach().clone()
    return out


# ---------------------------------------------------------------------------- the worker (under torchrun)
def worker(engines: list[str], cases: list[str], out: Path) -> None:
    import torch.distributed as dist
    from modapt import distributed
    from modapt.registry import use_registry
    from safetensors.torch import save_file

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for engine in engines:
        (out / engine).mkdir(exist_ok=True)
        for case in cases:
            try:
                model, registry = train(case, engine, rank, world)
                tensors = distributed.adapter_full_state_dict(model)
                # what each rank holds, gathered on every rank: must be identical across ranks
                gathered = [None] * world
                dist.all_gather_object(gathered, adalora_state(model))
                if engine == "fsdp":
                    with use_registry(registry):
                        distributed.save(model, out / engine / f"{case}-saved")
                if rank == 0:
                    save_file({k: v.contiguous() for k, v in tensors.items()}, out / engine / f"{case}.safetensors")
                    save_file({f"rank{r}.{k}": v.contiguous() for r, g in enumerate(gathered) for k, v in g.items()},
                              out / engine / f"{case}-extra.safetensors")
                results[f"{engine}/{case}"] = "ok"
            except Exception as exc:  # noqa: BLE001  (one case failing must not hide the others)
                import traceback
                traceback.print_exc()
                results[f"{engine}/{case}"] = f"{type(exc).__name__}: {exc}"
            dist.barrier()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def launch(engines: list[str], cases: list[str], out: Path, timeout: float = 240) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", __file__,
           "--engines", ",".join(engines), "--out", str(out), *cases]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    results = out / "results.json"
    if not results.is_file():
        raise AssertionError(f"torchrun failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(results.read_text()) | {"_log": proc.stderr[-6000:]}


# ---------------------------------------------------------------------------- the tests
def available_cases() -> list[str]:
    found = []
    for case, (plugins, _, _) in CASES.items():
        try:
            for module in plugins.values():
                importlib.import_module(f"{module}.plugin")
        except ImportError:
            continue
        found.append(case)
    return found


ENGINES = ["ddp", "fsdp"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch (2 gloo processes) running every available case under both engines."""
    out = tmp_path_factory.mktemp("distributed")
    return out, launch(ENGINES, available_cases(), out)


@pytest.fixture(params=ENGINES)
def run(request, launched):
    """(engine, its output folder, {case: "ok" or the error})."""
    out, results = launched
    engine = request.param
    mine = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(engine + "/")}
    return engine, out / engine, mine | {"_log": results["_log"]}


_reference: dict[str, tuple] = {}


def reference(case: str):
    """(trained model, registry, AdaLoRA state) of the single-process run on the concatenated batch."""
    if case not in _reference:
        model, registry = train(case, "single", 0, 1)
        _reference[case] = (model, registry, adalora_state(model))
    return _reference[case]


def assert_close_dicts(got: dict, want: dict, what: str, atol=1e-5, rtol=1e-5):
    assert sorted(got) == sorted(want), what
    for k in sorted(want):
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=atol, rtol=rtol,
                                   msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_matches_single_process(run, case):
    for module in CASES[case][0].values():
        pytest.importorskip(module)
    import modapt
    from safetensors.torch import load_file

    engine, out, results = run
    assert results.get(case) == "ok", f"{engine}/{case}: {results.get(case)}\n{results['_log']}"
    got = load_file(out / f"{case}.safetensors")
    model, _, _ = reference(case)
    want = {k: v.detach() for k, v in modapt.adapter_state_dict(model).items()}
    assert_close_dicts(got, want, f"{engine}/{case}")
    # the comparison can fail: training moved the adapter well beyond the tolerance
    start = _initial_adapter(case)
    moved = max(float((want[k].float() - start[k].float()).abs().max()) for k in want if want[k].is_floating_point())
    assert moved > 1e-3, f"{case}: the adapter barely moved ({moved})"


def _initial_adapter(case: str) -> dict[str, torch.Tensor]:
    import modapt
    from modapt.registry import use_registry
    from modapt.testing import tiny_llama

    with use_registry(registry_for(case)):
        torch.manual_seed(0)
        model = modapt.apply(tiny_llama(seed=0), CASES[case][1])
        return {k: v.detach().clone() for k, v in modapt.adapter_state_dict(model).items()}


def test_adalora_allocation_is_the_same_on_every_rank(run):
    pytest.importorskip("modapt_adalora")
    from safetensors.torch import load_file

    engine, out, results = run
    assert results.get("adalora") == "ok", results.get("adalora")
    extra = load_file(out / "adalora-extra.safetensors")
    rank0 = {k.removeprefix("rank0."): v for k, v in extra.items() if k.startswith("rank0.")}
    rank1 = {k.removeprefix("rank1."): v for k, v in extra.items() if k.startswith("rank1.")}
    assert any(k.endswith("rank_pattern") for k in rank0) and any(k.endswith("sensitivity") for k in rank0)
    for k, value in rank0.items():  # bit-identical across ranks: one decision, from the same (averaged) gradients
        assert torch.equal(value, rank1[k]), f"{engine}: {k} differs across ranks"
    _, _, want = reference("adalora")
    # scores equal to the single-process ones: the allocator saw gradients already averaged over ranks
    assert_close_dicts(rank0, want, f"{engine}/adalora scores")
    patterns = [v for k, v in rank0.items() if k.endswith("rank_pattern")]
    assert not all(bool(p.all()) for p in patterns), "no triplet was pruned: the test would not see a wrong allocation"


#: saved and reloaded in the fast suite: MAP's replicated scalars, AdaLoRA's buffer, LMAM's attachment
SAVE_FAST = ("lomap", "adalora", "lmam")


@pytest.mark.parametrize("case", [c if c in SAVE_FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_fsdp_save_gathers_the_adapter_and_loads_and_merges(launched, case):
    for module in CASES[case][0].values():
        pytest.importorskip(module)
    import modapt
    from modapt.persistence import WEIGHTS_NAME_V2
    from modapt.registry import use_registry
    from modapt.testing import tiny_inputs, tiny_llama
    from safetensors.torch import load_file

    out, results = launched
    assert results.get(f"fsdp/{case}") == "ok", results.get(f"fsdp/{case}")
    saved = out / "fsdp" / f"{case}-saved"
    model, registry, _ = reference(case)
    want = {k: v.detach() for k, v in modapt.adapter_state_dict(model).items()}
    # only the adapter in the file, full shapes
    assert sorted(load_file(saved / WEIGHTS_NAME_V2)) == sorted(want)
    with use_registry(registry):
        fresh = modapt.load(tiny_llama(seed=0), saved)
        assert_close_dicts({k: v.detach() for k, v in modapt.adapter_state_dict(fresh).items()}, want,
                           f"loaded {case}")
        inputs = tiny_inputs(batch=2, seq=8)
        with torch.no_grad():
            before = fresh(**inputs).logits
            modapt.merge(fresh, unload=True)
            after = fresh(**inputs).logits
            expected = model.eval()(**inputs).logits
        torch.testing.assert_close(before, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)


def test_fsdp_vera_shared_projections_are_saved_once(launched):
    """VeRA under FSDP2: the gathered save holds the λ in modapt's file and, with save_projection,
    A and B once in the PEFT file, equal to the single-process model's shared buffers."""
    pytest.importorskip("modapt_vera")
    pytest.importorskip("modapt_export")
    import modapt
    from modapt.persistence import WEIGHTS_NAME_V2
    from modapt.registry import use_registry
    from modapt.testing import tiny_inputs, tiny_llama
    from safetensors.torch import load_file

    out, results = launched
    assert results.get("fsdp/vera") == "ok", f"{results.get('fsdp/vera')}\n{results['_log']}"
    saved = out / "fsdp" / "vera-saved"
    model, registry, _ = reference("vera")
    (projection,) = model.modapt_shared.values()  # one shared module for the 4 targets x 2 layers
    want = {k: v.detach() for k, v in modapt.adapter_state_dict(model).items()}
    assert sorted(load_file(saved / WEIGHTS_NAME_V2)) == sorted(want)  # the λ only: A, B regenerated
    peft_file = load_file(saved / "adapter_model.safetensors")
    shared = sorted(k for k in peft_file if "vera_A" in k or "vera_B" in k)
    assert shared == ["base_model.vera_A", "base_model.vera_B"]  # once, not once per layer
    assert torch.equal(peft_file["base_model.vera_A"], projection.vera_A)
    assert torch.equal(peft_file["base_model.vera_B"], projection.vera_B)
    with use_registry(registry):
        fresh = modapt.load(tiny_llama(seed=0), saved).eval()
        inputs = tiny_inputs(batch=2, seq=8)
        with torch.no_grad():
            torch.testing.assert_close(fresh(**inputs).logits, model.eval()(**inputs).logits, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    worker(args.engines.split(","), args.cases, args.out)
