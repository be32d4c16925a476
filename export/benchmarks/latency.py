"""ONNX Runtime latency of base vs merged-LoRA vs LMAM graphs, and PyTorch eager, on the same inputs.

A random LLaMA-shaped causal LM (``--size tiny`` or ``smollm2-135m``: hidden 576, 30 layers,
9 heads, 3 KV heads, intermediate 1536, vocab 49152) is exported with ``modapt_export.export_onnx``
(causal-lm task, self-verified) as:

- ``base``: the model as built;
- ``merged``: LoRA r=16 on every linear layer, B randomised, folded into the weights by the export;
- ``lmam``: LMAM on every attention module (when ``modapt_lmam`` is installed);
- ``inputs``: the same LoRA as ``merged`` saved as an adapter folder and exported with
  ``--adapters-as-inputs`` (base graph + ``adapters/lora.onnx_adapter``), timed with that adapter
  active (``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter``).

Each graph is timed on a prefill of ``batch × seq`` tokens (empty past) with whatever provider
ONNX Runtime offers: on CUDA with IO binding (inputs and outputs stay on the GPU) in fp16, on
CPU in fp32. PyTorch eager runs the base model on the same inputs (same wrapper, same outputs).

    python export/benchmarks/latency.py --size tiny
    python export/benchmarks/latency.py --size smollm2-135m --shapes 1x64 8x512 --repeats 50

Prints a markdown table; ``--json FILE`` writes the figures. ``--interleave`` times the graphs in
rounds (one run each, order rotated) and gives each its paired per-round ratio to the base, which
drift between timing blocks (±5 % on a GPU) does not affect; ``--ratio-to merged`` takes the
ratios against another graph (the adapters-as-inputs cost: ``--variants merged inputs --ratio-to merged``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import modapt
from modapt_export import OrtModel, export_onnx
from modapt_export import adapter_inputs
from modapt_export.onnx_io import CausalLMWithCache, cache_geometry
from modapt_export.ort_model import node_times

SIZES = {
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3),
}


def build_model(size: str, device, dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, pad_token_id=0, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def adapt(model, variant: str, seed: int = 1):
    """Apply the variant's adapter and give every trainable tensor noise (so nothing is an identity)."""
    if variant == "base":
        return model
    if variant in ("merged", "inputs"):
        recipe = {"adapter": [{"method": "lora", "targets": "all-linear", "r": 16}]}
    else:
        recipe = {"adapter": [{"method": "lmam", "r": 2, "n": 128, "init": "random"}]}
    modapt.apply(model, recipe)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype))
    return model


def inputs(config, batch: int, seq: int, device, dtype) -> dict[str, torch.Tensor]:
    geo = cache_geometry(config)
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    feeds = {"input_ids": torch.randint(1, config.vocab_size, (batch, seq), generator=gen),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long),
             "position_ids": torch.arange(seq).expand(batch, seq).contiguous()}
    for i in range(geo.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = torch.zeros(batch, geo.kv_heads, 0, geo.head_dim, dtype=dtype)
    return {k: v.to(device) for k, v in feeds.items()}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device) -> float:
    """Milliseconds of one run of ``fn``, the device synchronised after it."""
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "min_ms": times[0]}


def timed(fn, device, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    return summary([time_once(fn, device) for _ in range(repeats)])


def timed_interleaved(fns: dict, device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Times of ``fns`` (name: run) in ``repeats`` rounds, each run once a round, timed as :func:`timed`.

    Every run is warmed up first; round ``r`` starts with the ``r``-th run (round-robin), so none
    always goes first. Returns each name's times in round order: index ``r`` of two lists is a pair.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            times[name].append(time_once(fns[name], device))
    return times


def paired_ratios(times: list[float], base: list[float]) -> dict:
    """Median and 10th/90th percentiles (linear interpolation) of the per-round ratios ``times / base``."""
    ratios = [t / b for t, b in zip(times, base, strict=True)]
    p10 = p90 = ratios[0]
    if len(ratios) > 1:
        deciles = statistics.quantiles(ratios, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    return {"ratio_to_base": statistics.median(ratios), "ratio_p10": p10, "ratio_p90": p90}


def time_torch(model, feeds, device, warmup, repeats) -> dict:
    wrapper = CausalLMWithCache(model).eval()
    args = tuple(feeds.values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run():
        with torch.no_grad():
            wrapper(*args)

    out = timed(run, device, warmup, repeats)
    if device.type == "cuda":
        out["max_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def ort_runner(ort: OrtModel, feeds, run_options=None):
    """One run of ``ort`` on ``feeds``: on CUDA through IO binding, on CPU from numpy.
    ``run_options`` carries an active adapter (the ``inputs`` variant)."""
    if ort.on_cuda:
        # IO binding: inputs bound where they live (GPU), outputs allocated by ORT on the GPU
        cuda_feeds = {k: v.to("cuda") for k, v in feeds.items()}
        io = ort.bind(cuda_feeds)  # bound once; each run writes fresh outputs on the GPU

        def run():
            ort.run_binding(io, run_options)
    else:
        host = {k: v.cpu().numpy() for k, v in feeds.items()}

        def run():
            ort.session.run(None, host, run_options)

    return run


def time_ort(ort: OrtModel, feeds, device, warmup, repeats, run_options=None) -> dict:
    runner = ort_runner(ort, feeds) if run_options is None else ort_runner(ort, feeds, run_options)
    return timed(runner, device, warmup, repeats)


def profile_ort(path: Path, feeds, device, runs: int, prefix: Path, threads: int | None) -> dict:
    """Where one graph's time goes: ONNX Runtime's own profiler over ``runs`` runs of ``feeds``.

    Returns ``{"nodes_by_provider": {provider: nodes}, "memcpy_nodes": k, "by_op": {op: {"calls",
    "us"}}}`` per run, ops sorted by time (:func:`modapt_export.ort_model.node_times`: host-side
    node times, so copies between host and device and CPU-placed nodes show their whole cost,
    which is what to look for when a graph with fewer nodes runs slower). The optimised graph is saved as ``prefix``.onnx
    (with the ``Memcpy`` nodes ORT inserted between providers); placement comes from the profile.
    """
    import onnx
    import onnxruntime

    def options(save: bool):
        opts = onnxruntime.SessionOptions()
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        if save:  # a first session writes the optimised graph and takes the first-run allocations
            opts.optimized_model_filepath = str(prefix) + ".onnx"
        else:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(prefix)
        return opts

    time_ort(OrtModel(path, session_options=options(True)), feeds, device, warmup=1, repeats=1)
    ort = OrtModel(path, session_options=options(False))
    time_ort(ort, feeds, device, warmup=runs - 1, repeats=1)  # exactly ``runs`` runs in the profile
    by_op = node_times(ort.session.end_profiling(), runs, ort.provider)
    for entry in by_op.values():
        entry["us"] = round(entry["us"], 1)
    graph = onnx.load(str(prefix) + ".onnx", load_external_data=False).graph
    providers: dict[str, int] = {}  # the profile's placement: each node runs once per run
    for op, entry in by_op.items():
        name = op.split(" [")[1].rstrip("]") if " [" in op else ort.provider.removesuffix("ExecutionProvider")
        providers[name] = providers.get(name, 0) + round(entry["calls"])
    return {"nodes_optimised": len(graph.node),
            "memcpy_nodes": sum(1 for node in graph.node if node.op_type.startswith("Memcpy")),
            "nodes_by_provider": providers,
            "by_op": by_op}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--shapes", nargs="+", default=["1x64", "8x512"], help="BATCHxSEQ prefill shapes")
    parser.add_argument("--variants", nargs="+", default=["base", "merged", "lmam"],
                        choices=["base", "merged", "lmam", "inputs"])
    parser.add_argument("--ratio-to", default="base", help="with --interleave: the graph the paired ratios are to")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where PyTorch runs and the export is traced (auto: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16"], default="auto",
                        help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where the exports go (default: a temporary directory)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="verification tolerance of the exports (default by dtype: fp32 1e-4, fp16 2e-2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and ONNX Runtime (default: their own defaults)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse exports already in --workdir (same size/variant/dtype; the weights are seeded)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--profile", type=int, default=0, metavar="RUNS",
                        help="also profile each graph over RUNS runs per shape with ONNX Runtime's profiler "
                             "(time by op type, nodes by provider, Memcpy count; files under --workdir)")
    parser.add_argument("--interleave", action="store_true",
                        help="export every graph first, then time them in rounds (each once a round, order "
                             "rotated) and report each graph's paired per-round ratio to the base")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    variants = list(args.variants)
    if "lmam" in variants:
        try:
            import modapt_lmam.plugin
        except ImportError:
            print("modapt_lmam not installed: skipping the lmam variant")
            variants.remove("lmam")
        else:
            registry = modapt.default_registry()
            if "lmam" not in registry.methods:  # importable but not installed (PYTHONPATH)
                registry.register_plugin(modapt_lmam.plugin, "lmam", "modapt-lmam")

    import onnxruntime

    session_options = None
    if args.threads:
        torch.set_num_threads(args.threads)
        session_options = onnxruntime.SessionOptions()
        session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.intra_op_num_threads = args.threads
        session_options.inter_op_num_threads = 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="modapt-latency-"))
    rows, meta = [], {"size": args.size, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                      "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                      "ort_providers": onnxruntime.get_available_providers(), "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "exports": {}}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()

    def export(variant: str):
        model = adapt(build_model(args.size, device, dtype), variant)
        out = workdir / f"{args.size}-{variant}-{meta['dtype']}"
        start = time.perf_counter()
        if args.reuse and (out / "modapt_export.json").is_file():
            manifest = json.loads((out / "modapt_export.json").read_text())
        elif variant == "inputs":  # the LoRA saved as a folder, then exported as graph inputs of the base
            modapt.save(model, workdir / "lora")
            model = build_model(args.size, device, dtype)
            adapters = adapter_inputs.read_adapter_set(model, [workdir / "lora"])
            manifest = export_onnx(model, out, "causal-lm", overwrite=True, tolerance=args.tolerance,
                                   adapters=adapters)
        else:
            manifest = export_onnx(model, out, "causal-lm", overwrite=True, tolerance=args.tolerance)
        seconds = manifest.get("export_seconds", round(time.perf_counter() - start, 1))
        meta["exports"][variant] = {"seconds": seconds, "nodes": manifest["nodes"],
                                    "max_abs_error": manifest["verification"]["max_abs_error"],
                                    "verified_on": manifest["verification"]["provider"]}
        if variant == "inputs":
            options, keep = adapter_inputs.run_options_for(out / "adapters" / f"lora{adapter_inputs.ADAPTER_SUFFIX}")
            run_options[variant] = (options, keep)
        print(f"exported {variant}: {manifest['nodes']} nodes, {meta['exports'][variant]['seconds']} s, "
              f"max abs error {manifest['verification']['max_abs_error']:.3g} on {manifest['verification']['provider']}",
              flush=True)
        return model, out

    run_options: dict = {}  # variant -> (RunOptions with its adapter active, the LoraAdapter kept alive)

    def options_of(variant: str):
        return run_options.get(variant, (None, None))[0]

    def ort_row(variant: str, ort: OrtModel, batch: int, seq: int, t: dict) -> dict:
        return {"graph": f"ORT {variant}", "provider": ort.provider + (" + IO binding" if ort.on_cuda else ""),
                "batch": batch, "seq": seq, **t}

    def profile(variant: str, out: Path, feeds, batch: int, seq: int) -> None:
        prof = profile_ort(out, feeds, device, args.profile, workdir / f"profile-{variant}-{batch}x{seq}",
                           args.threads)
        meta.setdefault("profiles", {})[f"{variant} {batch}x{seq}"] = prof
        top = ", ".join(f"{op} {e['us']:.0f} µs ×{e['calls']:.0f}" for op, e in list(prof["by_op"].items())[:8])
        print(f"profile {variant} {batch}x{seq}: {prof['nodes_optimised']} nodes after optimisation, "
              f"{prof['memcpy_nodes']} Memcpy, by provider {prof['nodes_by_provider']}; per run: {top}",
              flush=True)

    def time_eager(model, feeds, batch: int, seq: int) -> None:
        t = time_torch(model, feeds, device, args.warmup, args.repeats)
        rows.append({"graph": "torch eager (base)", "provider": str(device), "batch": batch, "seq": seq, **t})
        print(rows[-1], flush=True)

    if not args.interleave:
        for variant in variants:
            model, out = export(variant)
            ort = OrtModel(out, session_options=session_options)
            for batch, seq in shapes:
                feeds = inputs(model.config, batch, seq, device, dtype)
                if variant == "base":
                    time_eager(model, feeds, batch, seq)
                rows.append(ort_row(variant, ort, batch, seq, time_ort(ort, feeds, device, args.warmup, args.repeats,
                                                                       options_of(variant))))
                print(rows[-1], flush=True)
                if args.profile:
                    profile(variant, out, feeds, batch, seq)
            del ort, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    else:
        # every graph exported and its session open first; only the base model is kept (for eager)
        if args.ratio_to not in variants:
            print(f"--interleave without the {args.ratio_to} variant: no ratios")
        sessions, outs, eager, config = {}, {}, None, None
        for variant in variants:
            model, outs[variant] = export(variant)
            config = model.config
            sessions[variant] = OrtModel(outs[variant], session_options=session_options)
            if variant == "base":
                eager = model
            else:
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for batch, seq in shapes:
            feeds = inputs(config, batch, seq, device, dtype)
            if eager is not None:
                time_eager(eager, feeds, batch, seq)
            # the adapter's RunOptions only where there is one (ort_runner's two-argument form otherwise)
            times = timed_interleaved({v: ort_runner(ort, feeds, *[o for o in [options_of(v)] if o is not None])
                                       for v, ort in sessions.items()},
                                      device, args.warmup, args.repeats)
            for variant, ort in sessions.items():
                row = ort_row(variant, ort, batch, seq, {**summary(times[variant]), "runs": len(times[variant])})
                if variant != args.ratio_to and args.ratio_to in times:
                    row.update(paired_ratios(times[variant], times[args.ratio_to]))
                rows.append(row)
                print(row, flush=True)
            if args.profile:
                for variant in sessions:
                    profile(variant, outs[variant], feeds, batch, seq)
        del sessions, eager

    print(f"\n{args.size}, {meta['dtype']}, {meta.get('gpu', meta['cpu'])}, torch {meta['torch']}, "
          f"onnxruntime {meta['onnxruntime']}, median of {args.repeats} ({args.warmup} warm-up)"
          + (", ONNX Runtime graphs interleaved (one run each per round, order rotated)" if args.interleave else "")
          + "\n")
    paired = any("ratio_to_base" in r for r in rows)
    print("| graph | provider | batch × seq | median ms | p90 ms |" + (f" × {args.ratio_to} (paired) |" if paired else ""))
    print("|---|---|---|---|---|" + ("---|" if paired else ""))
    for r in rows:
        line = f"| {r['graph']} | {r['provider']} | {r['batch']} × {r['seq']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |"
        if paired:
            if "ratio_to_base" in r:
                line += f" {r['ratio_to_base']:.3f} ({r['ratio_p10']:.3f}–{r['ratio_p90']:.3f}) |"
            else:
                line += " 1.000 |" if r["graph"] == f"ORT {args.ratio_to}" else " |"
        print(line)
    print("\n| export | nodes | seconds | max abs error (verification) |")
    print("|---|---|---|---|")
    for v, e in meta["exports"].items():
        print(f"| {v} | {e['nodes']} | {e['seconds']} | {e['max_abs_error']:.3g} ({e['verified_on']}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
