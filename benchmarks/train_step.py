"""modapt vs PEFT: training-step time, tokens/s, peak memory, and inference latency.

    python -m benchmarks.train_step --size tiny                    # CPU smoke (the test suite runs it)
    OMP_NUM_THREADS=1 python -m benchmarks.train_step --size proxy --compile default   # CPU launch-bound proxy
    python -m benchmarks.train_step --size 1b --rank 16            # the ~1B LLaMA shape, B=8, T=1024 (GPU)
    python -m benchmarks.train_step --size 135m --batch 32 --seq 64 --precision autocast   # the demo's regime
    python -m benchmarks.train_step --size 135m --precision autocast \
        --methods peft-lora,lora,full-ft,lora@reduce-overhead,peft-lora@reduce-overhead   # eager and compiled rows
    python -m benchmarks.train_step --size 7b --quantize 4bit --rank 16 \
        --methods peft-lora,lora,peft-dora,dora,lomap,lorma-plus          # QLoRA: the same 4-bit base (GPU)

Every method runs on a fresh LLaMA-shaped model built from a config with random weights (no
downloads), the same targets (q, k, v, o, gate, up, down) and rank. The baseline (ratio 1.00)
is PEFT LoRA measured in the same process. A step is forward + backward + optimizer step
(+ the plugins' hooks), CUDA-synchronised; the median over ``--steps`` after ``--warmup``.
Results: JSON, a Markdown table and a PNG bar chart under ``--out``.

``--quantize 4bit`` (nf4, double quantization) or ``8bit`` replaces every decoder linear layer
(not ``lm_head``) of the freshly built model by its bitsandbytes counterpart, compute dtype
bf16 on CUDA (fp32 on the CPU), and prepares the base for k-bit training the same way for
every row (PEFT rows: ``peft.prepare_model_for_kbit_training``; modapt rows:
``modapt.quantized.prepare_for_kbit_training``; no gradient checkpointing on either side), so
PEFT QLoRA and modapt's methods train on the same quantized base.

``METHOD@MODE`` runs a method under ``torch.compile`` (see :data:`COMPILE_MODES`): the model is
compiled after it is adapted (forward, loss and, through AOT autograd, backward); the optimizer
step, the plugins' hooks and AdaLoRA's regulariser stay eager. The first step (compilation) is
timed apart as ``compile_s``; with CUDA graphs (``reduce-overhead``) two more warm-up steps
record the graphs. Compiled rows report no inference latency (an eval forward, and the merged
model, would each compile again).

``--profile STEPS`` runs STEPS more steps of each method under ``torch.profiler`` after the timed
ones and writes its op table (by self time on the GPU, or on the CPU without one) to
``OUT/profile_<method>.txt``, with device milliseconds and kernels per step in the JSON: the
profile the issue asks for where a target is missed, e.g.
``python -m benchmarks.train_step --size 1b --methods peft-lora,lora,lomap,dora --profile 3``.
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
    # the 135M regime's stand-in on a CPU: many layers too small for their arithmetic to matter
    "proxy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, batch=4, seq=16),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, batch=32, seq=64),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, batch=8, seq=1024),
    # LLaMA-2-7B's shape, for --quantize (QLoRA on one GPU)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, batch=4, seq=1024),
}


# METHOD@MODE -> torch.compile arguments. "compile" is the default mode; "aot_eager" traces and
# runs AOT autograd without inductor (no C compiler or Triton needed): correctness, not speed;
# "cudagraphs" (CUDA only) replays those graphs as CUDA graphs, still without inductor.
COMPILE_MODES = {
    "compile": {"mode": "default"},
    "default": {"mode": "default"},
    "reduce-overhead": {"mode": "reduce-overhead"},  # CUDA graphs (the 135M shapes are static)
    "max-autotune": {"mode": "max-autotune"},
    "max-autotune-no-cudagraphs": {"mode": "max-autotune-no-cudagraphs"},
    "aot_eager": {"backend": "aot_eager"},
    # CUDA graphs of the AOT graphs without inductor: launches removed, kernels unchanged (no Triton)
    "cudagraphs": {"backend": "cudagraphs"},
}
CUDA_GRAPH_MODES = {"reduce-overhead", "max-autotune", "cudagraphs"}


def split_method(name: str) -> tuple[str, str | None]:
    """``"lora@reduce-overhead"`` -> ``("lora", "reduce-overhead")``; ``"lora"`` -> ``("lora", None)``."""
    method, _, mode = name.partition("@")
    if mode and mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r} in {name!r}; accepted: {', '.join(COMPILE_MODES)}")
    return method, mode or None


def expand_methods(methods: str, compile_modes: str) -> list[str]:
    """The method list, each eager method followed by its compiled rows for ``--compile``'s modes."""
    modes = [m for m in compile_modes.split(",") if m and m != "none"]
    for mode in modes:
        split_method(f"x@{mode}")  # validates
    out = []
    for name in methods.split(","):
        out.append(name)
        if "@" not in name:
            out.extend(f"{name}@{mode}" for mode in modes)
    return out


@dataclass
class Setup:
    size: str
    rank: int
    batch: int
    seq: int
    steps: int
    device: str
    precision: str  # "bf16" (model in bf16), "autocast" (fp32 weights, bf16 autocast), "fp32"
    profile: int = 0  # steps run under torch.profiler after the timed ones (0: none)
    profile_dir: str = ""  # where each method's profile table goes
    quantize: str | None = None  # "4bit" / "8bit": bitsandbytes base (see the module docstring)


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
    if setup.quantize:
        quantize_linear_layers(model, setup)
    return model


def quantize_linear_layers(model, setup: Setup) -> None:
    """Every decoder ``nn.Linear`` (not ``lm_head``) replaced by a bitsandbytes layer holding its
    weight quantized (nf4 + double quantization, or LLM.int8), computing in bf16 on CUDA."""
    import bitsandbytes as bnb

    compute = torch.bfloat16 if setup.device == "cuda" else torch.float32
    for path in [n for n, _ in model.named_modules()]:  # names only: each float weight is freed once replaced
        module = model.get_submodule(path)
        if type(module) is not torch.nn.Linear or path.endswith("lm_head"):
            continue
        weight = module.weight.detach().to("cpu", compute)
        if setup.quantize == "4bit":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=compute, quant_type="nf4", compress_statistics=True,
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        else:
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False, device="meta")
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.detach().to("cpu", compute), requires_grad=False)
        layer = layer.to(setup.device)  # bitsandbytes quantizes on this move
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        del module, weight
    if setup.device == "cuda":
        torch.cuda.empty_cache()


def modapt_recipe(name: str, r: int, total_steps: int) -> dict | None:
    lora = {"method": "lora", "r": r, "lora_alpha": float(2 * r)}
    lmam = {"method": "lmam", "heads": None, "r": 2, "n": 128}
    recipes = {
        "lora": {"adapter": [{**lora, "targets": LINEAR}]},
        "lora-module": {"adapter": [{**lora, "targets": LINEAR}]},  # measured with fast_paths(one_node=False)
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
    before = after = lambda step: None
    if name == "full-ft":
        if setup.quantize:
            return None  # a quantized base has no full fine-tuning

    elif name.startswith("peft-"):
        if setup.quantize:
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = peft_model(name, model, setup.rank, total_steps)
        if name == "peft-adalora":
            after = lambda step: model.base_model.update_and_allocate(step)
    else:
        recipe = modapt_recipe(name, setup.rank, total_steps)
        needed = {a["method"] for a in recipe["adapter"]} | {a["update"]["method"] for a in recipe["adapter"]
                                                             if "update" in a}
        if not needed <= set(modapt.default_registry().methods):
            return None
        if setup.quantize:
            from modapt.quantized import prepare_for_kbit_training

            prepare_for_kbit_training(model, gradient_checkpointing=False)
        modapt.apply(model, recipe)
        before = lambda step: modapt.before_optimizer_step(model, step)
        after = lambda step: modapt.after_optimizer_step(model, step)
    return model, before, after


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, setup: Setup, warmup: int) -> dict | None:
    """One method's figures. ``peak_gib`` counts only what this method allocated (its model
    included): the memory still allocated when it starts, ``leftover_gib``, is subtracted. An
    adapted model holds reference cycles (a host and its update point at each other), so the
    previous method's model can outlive it until the garbage collector runs; collected here
    first, and reported if anything still remains. ``lora-module`` is modapt LoRA with its
    one-node layer switched off (``modapt.fast_paths(one_node=False)``): the module path, for comparison."""
    import modapt

    method = split_method(name)[0]
    with modapt.fast_paths(one_node=False if method == "lora-module" else None):  # LoRA's module path, to compare
        return _measure(name, setup, warmup)


def _measure(name: str, setup: Setup, warmup: int) -> dict | None:
    method, mode = split_method(name)
    if mode is not None:
        torch._dynamo.reset()  # a fresh cache: earlier methods' graphs neither count nor crowd the cache
        torch._dynamo.utils.counters.clear()
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()
    leftover = torch.cuda.memory_allocated() if setup.device == "cuda" else 0
    cudagraphs = mode in CUDA_GRAPH_MODES and setup.device == "cuda"
    compile_steps = 0 if mode is None else (3 if cudagraphs else 1)
    total = compile_steps + warmup + setup.steps + setup.profile
    prepared = prepare(method, setup, total)
    if prepared is None:
        return None
    model, before, after = prepared
    del prepared
    import modapt

    forward = model if mode is None else torch.compile(model, **COMPILE_MODES[mode])

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (setup.batch, setup.seq), generator=gen).to(setup.device)
    use_regularizer = method in ("adalora", "adalomap")
    autocast = torch.autocast(setup.device, dtype=torch.bfloat16, enabled=setup.precision == "autocast")
    times, compile_times = [], []
    model.train()

    def train_step(step: int) -> None:
        if cudagraphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = forward(input_ids=ids, labels=ids).loss
            if use_regularizer:
                loss = loss + modapt.regularization_loss(model)
        loss.backward()
        before(step)
        optimizer.step()
        after(step)
        optimizer.zero_grad(set_to_none=True)

    timed_steps = compile_steps + warmup + setup.steps
    for step in range(timed_steps):
        if step == compile_steps and setup.device == "cuda":  # the peak of training, not of compiling
            torch.cuda.reset_peak_memory_stats()
        synchronize(setup.device)
        start = time.perf_counter()
        train_step(step)
        synchronize(setup.device)
        if step < compile_steps:
            compile_times.append(time.perf_counter() - start)
        elif step >= compile_steps + warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - leftover) / 2**30 if setup.device == "cuda" else None
    compiled = {}
    if mode is not None:
        counters = torch._dynamo.utils.counters
        compiled = {"compile_s": sum(compile_times), "graphs": counters["stats"]["unique_graphs"],
                    "graph_breaks": sum(counters["graph_break"].values())}
    result = {"method": name, "step_ms": statistics.median(times) * 1000,
              "tokens_per_s": setup.batch * setup.seq / statistics.median(times),
              "peak_gib": peak, "trainable": sum(p.numel() for p in params),
              "infer_ms": None, "infer_merged_ms": None, "leftover_gib": leftover / 2**30, **compiled}
    if setup.profile:
        result["profile"] = profile_steps(name, train_step, range(timed_steps, total), setup)
    if mode is None:
        result["infer_ms"], result["infer_merged_ms"] = _inference(model, method, ids, setup, autocast)
    # the hooks' closures (and train_step's) hold the model too: clear every name they read
    model = forward = optimizer = params = before = after = None
    if mode is not None:
        torch._dynamo.reset()  # the compiled graphs and their CUDA graph pools
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()
    return result


def profile_steps(name: str, train_step: Callable[[int], None], steps: range, setup: Setup) -> dict:
    """Run ``steps`` under torch.profiler; write the op table (top 40 by self time on the device,
    or on the CPU without CUDA) to ``profile_dir/profile_<name>.txt`` and return per-step totals:
    ``{"steps", "device_ms", "cpu_ms", "kernels", "table"}``. Where a method's step time is
    missed, this says which kernels (or which host-side dispatch) the extra time goes to."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device == "cuda" else [])
    synchronize(setup.device)
    with profile(activities=activities) as prof:
        for step in steps:
            train_step(step)
        synchronize(setup.device)
    events = prof.key_averages()
    on_device = setup.device == "cuda"
    sort = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    path = Path(setup.profile_dir) / f"profile_{name.replace('@', '_at_')}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{name}: {len(steps)} steps profiled\n" + events.table(sort_by=sort, row_limit=40) + "\n")
    # the device's own events only (kernels, copies): an aten op's row also carries the time of the
    # kernels it launched, and a user annotation (the optimizer step) spans others, so summing every
    # row counted each kernel about twice (the JSONs of runs before 2026-12-04 did)
    kernel_events = [e for e in events if on_device and e.device_type == DeviceType.CUDA
                     and not getattr(e, "is_user_annotation", False)]
    device_us = sum(e.self_device_time_total for e in kernel_events)
    kernels = sum(e.count for e in kernel_events)
    return {"steps": len(steps), "device_ms": device_us / 1000 / len(steps),
            "cpu_ms": sum(e.self_cpu_time_total for e in events) / 1000 / len(steps),
            "kernels": kernels / len(steps), "table": str(path)}


def _inference(model, name: str, ids, setup: Setup, autocast) -> tuple[float, float | None]:
    """Eval-mode forward latency in ms, unmerged and (for mergeable modapt methods) merged."""
    import modapt

    model.eval()
    with torch.no_grad(), autocast:
        infer = _latency(lambda: model(input_ids=ids), setup.device, max(3, setup.steps // 2))
        merged = None
        if not name.startswith("peft-") and name != "full-ft":
            state = modapt.state_of(model)
            if all(modapt.default_registry().method(m).capabilities.mergeable for m in state.recipe.methods()):
                modapt.merge(model, unload=True)
                merged = _latency(lambda: model(input_ids=ids), setup.device, max(3, setup.steps // 2))
    return infer, merged


def _latency(fn: Callable, device: str, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    from modapt.testing.step_timing import time_steps

    seconds, _ = time_steps(fn, torch.device(device), 1, repeats)
    return statistics.median(seconds) * 1000


def table(results: list[dict]) -> str:
    """The Markdown table; ratios to eager PEFT LoRA, and for compiled rows also to PEFT LoRA
    compiled the same way (``× PEFT same mode``) when that row was run."""
    by_name = {r["method"]: r for r in results}
    base = by_name.get("peft-lora")
    compiled = any("@" in r["method"] for r in results)
    head = "| method | step ms | × PEFT LoRA | tokens/s | peak GiB | × mem | trainable | infer ms | merged ms |"
    if compiled:
        head += " × PEFT same mode | compile s | graphs | graph breaks |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]

    def num(value, fmt):
        return format(value, fmt) if value is not None else "–"

    for r in results:
        ratio = f"{r['step_ms'] / base['step_ms']:.2f}" if base else "–"
        mem = (f"{r['peak_gib'] / base['peak_gib']:.2f}" if base and r["peak_gib"] and base["peak_gib"] else "–")
        line = (f"| {r['method']} | {r['step_ms']:.1f} | {ratio} | {r['tokens_per_s']:.0f} | {num(r['peak_gib'], '.2f')} "
                f"| {mem} | {r['trainable']:,} | {num(r['infer_ms'], '.1f')} | {num(r['infer_merged_ms'], '.1f')} |")
        if compiled:
            mode = split_method(r["method"])[1]
            peer = by_name.get(f"peft-lora@{mode}" if mode else "peft-lora")
            same = f"{r['step_ms'] / peer['step_ms']:.2f}" if peer else "–"
            line += (f" {same} | {num(r.get('compile_s'), '.1f')} | {num(r.get('graphs'), 'd')} "
                     f"| {num(r.get('graph_breaks'), 'd')} |")
        lines.append(line)
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
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated; METHOD@MODE runs METHOD under torch.compile, MODE one of "
                             + ", ".join(COMPILE_MODES))
    parser.add_argument("--compile", default="none",
                        help="comma-separated compile modes: each eager method listed is also run compiled "
                             "in each (side by side); 'none' (default) adds no rows")
    parser.add_argument("--quantize", choices=["4bit", "8bit"], default=None,
                        help="train on a bitsandbytes base: 4bit (nf4, double quant) or 8bit (LLM.int8)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the timed steps, run STEPS more under torch.profiler and write each "
                             "method's op table to OUT/profile_<method>.txt (device time, kernels per step)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = SIZES[args.size]
    setup = Setup(args.size, args.rank, args.batch or size["batch"], args.seq or size["seq"],
                  args.steps or (10 if device == "cuda" else 3), device,
                  args.precision or ("bf16" if device == "cuda" else "fp32"), args.profile, args.out, args.quantize)
    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 1)
    try:
        names = expand_methods(args.methods, args.compile)
    except ValueError as exc:
        parser.error(str(exc))
    results = []
    for name in names:
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
    if args.quantize:
        stem += f"_{args.quantize}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = f"{json.dumps(meta)}\n\n{table(results)}\n"
    (out / f"{stem}.md").write_text(md)
    plot(results, out / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
