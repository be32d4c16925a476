"""modapt vs PEFT: training-step time, tokens/s, peak memory, and inference latency.

    python -m benchmarks.train_step --size tiny                    # CPU smoke (the test suite runs it)
    python -m benchmarks.train_step --size 1b --rank 16            # the ~1B LLaMA shape, B=8, T=1024 (GPU)
    python -m benchmarks.train_step --size 135m --batch 32 --seq 64 --precision autocast   # the demo's regime

Every method runs on a fresh LLaMA-shaped model built from a config with random weights (no
downloads), the same targets (q, k, v, o, gate, up, down) and rank. The baseline (ratio 1.00)
is PEFT LoRA measured in the same process. A step is forward + backward + optimizer step
(+ the plugins' hooks), CUDA-synchronised; the median over ``--steps`` after ``--warmup``.
Results: JSON, a Markdown table and a PNG bar chart under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, batch=2, seq=32),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, batch=32, seq=64),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, batch=8, seq=1024),
}


@dataclass
class Setup:
    size: str
    rank: int
    batch: int
    seq: int
    steps: int
    device: str
    precision: str  # "bf16" (model in bf16), "autocast" (fp32 weights, bf16 autocast), "fp32"


def build_model(setup: Setup):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in SIZES[setup.size].items() if k not in ("batch", "seq")}
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, max_position_embeddings=max(2048, setup.seq), attn_implementation="sdpa",
                         use_cache=False)
    with torch.device(setup.device):
        model = LlamaForCausalLM(config)
    if setup.precision == "bf16":
        model.to(torch.bfloat16)
    return model


def modapt_recipe(name: str, r: int, total_steps: int) -> dict | None:
    lora = {"method": "lora", "r": r, "lora_alpha": float(2 * r)}
    lmam = {"method": "lmam", "heads": None, "r": 2, "n": 128}
    recipes = {
        "lora": {"adapter": [{**lora, "targets": LINEAR}]},
        "dora": {"adapter": [{"method": "dora", "targets": LINEAR, "update": lora}]},
        "lomap": {"adapter": [{"method": "map", "targets": LINEAR, "update": lora}]},
        "adalora": {"adapter": [{"method": "adalora", "init_r": r, "target_r": max(1, r // 2), "lora_alpha": float(2 * r),
                                 "total_step": total_steps, "tinit": 0, "tfinal": 0, "deltaT": 1,
                                 "targets": LINEAR}]},
        "adalomap": {"adapter": [{"method": "map", "targets": LINEAR, "update": {
            "method": "adalora", "init_r": r, "target_r": max(1, r // 2), "lora_alpha": float(2 * r),
            "total_step": total_steps, "tinit": 0, "tfinal": 0, "deltaT": 1}}]},
        "lorma-plus": {"adapter": [{"method": "lorma", "r": r, "lora_alpha": float(r), "inflation": "plus",
                                    "targets": LINEAR}]},
        "lorma-pi": {"adapter": [{"method": "lorma", "r": r, "lora_alpha": float(r), "inflation": "pi",
                                  "targets": LINEAR}]},
        "lorma-pi-direct": {"adapter": [{"method": "lorma", "r": r, "lora_alpha": float(r), "inflation": "pi",
                                         "pi_path": "direct", "targets": LINEAR}]},
        "lorma-pi-fft": {"adapter": [{"method": "lorma", "r": r, "lora_alpha": float(r), "inflation": "pi",
                                      "pi_path": "fft", "targets": LINEAR}]},
        "lorma-pi-weight": {"adapter": [{"method": "lorma", "r": r, "lora_alpha": float(r), "inflation": "pi",
                                         "pi_path": "weight", "targets": LINEAR}]},
        "lora+lmam": {"adapter": [{**lora, "targets": LINEAR}, {k: v for k, v in lmam.items() if v is not None}]},
        "quanta+lmam": {"adapter": [{"method": "quanta", "targets": LINEAR},
                                    {k: v for k, v in lmam.items() if v is not None}]},
    }
    return recipes.get(name)


def peft_model(name: str, model, r: int, total_steps: int):
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if name == "peft-lora":
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LINEAR)
    elif name == "peft-dora":
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LINEAR, use_dora=True)
    elif name == "peft-adalora":
        config = AdaLoraConfig(init_r=r, target_r=max(1, r // 2), lora_alpha=2 * r, target_modules=LINEAR,
                               total_step=total_steps, tinit=0, tfinal=0, deltaT=1)
    else:
        raise KeyError(name)
    return get_peft_model(model, config)


METHODS = ["peft-lora", "lora", "peft-dora", "dora", "lomap", "peft-adalora", "adalora", "adalomap", "lorma-plus",
           "lorma-pi-direct", "lorma-pi-fft", "lorma-pi-weight", "lorma-pi", "lora+lmam", "quanta+lmam", "full-ft"]


def prepare(name: str, setup: Setup, total_steps: int):
    """(model, step hooks) for one method; ``None`` when its plugin is not installed."""
    import modapt

    model = build_model(setup)
    before = after = lambda step: None  # noqa: E731
    if name == "full-ft":
        pass
    elif name.startswith("peft-"):
        model = peft_model(name, model, setup.rank, total_steps)
        if name == "peft-adalora":
            after = lambda step: model.base_model.update_and_allocate(step)  # noqa: E731
    else:
        recipe = modapt_recipe(name, setup.rank, total_steps)
        needed = {a["method"] for a in recipe["adapter"]} | {a["update"]["method"] for a in recipe["adapter"]
                                                             if "update" in a}
        if not needed <= set(modapt.default_registry().methods):
            return None
        modapt.apply(model, recipe)
        before = lambda step: modapt.before_optimizer_step(model, step)  # noqa: E731
        after = lambda step: modapt.after_optimizer_step(model, step)  # noqa: E731
    return model, before, after


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, setup: Setup, warmup: int) -> dict | None:
    """One method's figures. ``peak_gib`` counts only what this method allocated (its model
    included): the memory still allocated when it starts, ``leftover_gib``, is subtracted. An
    adapted model holds reference cycles (a host and its update point at each other), so the
    previous method's model can outlive it until the garbage collector runs; collected here
    first, and reported if anything still remains."""
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()
    leftover = torch.cuda.memory_allocated() if setup.device == "cuda" else 0
    total = warmup + setup.steps
    prepared = prepare(name, setup, total)
    if prepared is None:
        return None
    model, before, after = prepared
    del prepared
    import modapt

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (setup.batch, setup.seq), generator=gen).to(setup.device)
    use_regularizer = name in ("adalora", "adalomap")
    autocast = torch.autocast(setup.device, dtype=torch.bfloat16, enabled=setup.precision == "autocast")
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    model.train()
    for step in range(total):
        synchronize(setup.device)
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
            if use_regularizer:
                loss = loss + modapt.regularization_loss(model)
        loss.backward()
        before(step)
        optimizer.step()
        after(step)
        optimizer.zero_grad(set_to_none=True)
        synchronize(setup.device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - leftover) / 2**30 if setup.device == "cuda" else None
    model.eval()
    with torch.no_grad(), autocast:
        infer = _latency(lambda: model(input_ids=ids), setup.device, max(3, setup.steps // 2))
        merged = None
        if not name.startswith("peft-") and name != "full-ft":
            state = modapt.state_of(model)
            if all(modapt.default_registry().method(m).capabilities.mergeable for m in state.recipe.methods()):
                modapt.merge(model, unload=True)
                merged = _latency(lambda: model(input_ids=ids), setup.device, max(3, setup.steps // 2))
    result = {"method": name, "step_ms": statistics.median(times) * 1000,
              "tokens_per_s": setup.batch * setup.seq / statistics.median(times),
              "peak_gib": peak, "trainable": sum(p.numel() for p in params),
              "infer_ms": infer, "infer_merged_ms": merged, "leftover_gib": leftover / 2**30}
    del model, optimizer, params, before, after  # the hooks' closures hold the model too
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()
    return result


def _latency(fn: Callable, device: str, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    from modapt.testing.step_timing import time_steps

    seconds, _ = time_steps(fn, torch.device(device), 1, repeats)
    return statistics.median(seconds) * 1000


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["method"] == "peft-lora"), None)
    lines = ["| method | step ms | × PEFT LoRA | tokens/s | peak GiB | × mem | trainable | infer ms | merged ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ratio = f"{r['step_ms'] / base['step_ms']:.2f}" if base else "–"
        mem = (f"{r['peak_gib'] / base['peak_gib']:.2f}" if base and r["peak_gib"] and base["peak_gib"] else "–")
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "–"
        merged = f"{r['infer_merged_ms']:.1f}" if r["infer_merged_ms"] is not None else "–"
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {ratio} | {r['tokens_per_s']:.0f} | {peak} | {mem} | "
                     f"{r['trainable']:,} | {r['infer_ms']:.1f} | {merged} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    base = next((r for r in results if r["method"] == "peft-lora"), None)
    if base is None:
        return
    names = [r["method"] for r in results]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.7), 3.5))
    ax.bar(names, [r["step_ms"] / base["step_ms"] for r in results])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("step time / PEFT LoRA")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 10 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--precision", choices=["bf16", "autocast", "fp32"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = SIZES[args.size]
    setup = Setup(args.size, args.rank, args.batch or size["batch"], args.seq or size["seq"],
                  args.steps or (10 if device == "cuda" else 3), device,
                  args.precision or ("bf16" if device == "cuda" else "fp32"))
    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 1)
    results = []
    for name in args.methods.split(","):
        try:
            result = measure(name, setup, warmup)
        except Exception as exc:  # one failing method must not lose the others' figures
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        if result is None:
            print(f"{name}: skipped (plugin not installed)", flush=True)
            continue
        results.append(result)
        print(json.dumps(result), flush=True)
    import peft
    import transformers

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "setup": setup.__dict__, "warmup": warmup,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_step_{args.size}_r{args.rank}_{setup.precision}_{device}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = f"{json.dumps(meta)}\n\n{table(results)}\n"
    (out / f"{stem}.md").write_text(md)
    plot(results, out / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
