"""What LMAM adds to an exported causal-LM graph: nodes per adapted layer, and ONNX Runtime (CPU) time.

A random LLaMA-shaped causal LM is exported twice with ``modapt_export.export_onnx`` (task
``causal-lm``, the KV-cache contract, self-verified): ``base`` and ``lmam`` (r = 2, n = 128 on
every attention module, random map). Printed per graph: nodes as written, nodes after ONNX
Runtime's own optimisation (``ORT_ENABLE_ALL``, CPU; ``sess_options.optimized_model_filepath``),
the extra nodes per adapted layer, the op types LMAM adds, ORT CPU latency of a prefill and of
one decode step (interleaved base/lmam runs, median), and with ``--profile`` the time per op
type from ORT's profiler (what the extra nodes cost).

    python plugins/lmam/benchmarks/export_graph.py --layers 2 --hidden 64 --heads 4 --kv-heads 2
    python plugins/lmam/benchmarks/export_graph.py --layers 30 --hidden 576 --heads 9 --kv-heads 3 \
        --intermediate 1536 --vocab 4096 --shapes 1x64 8x512 --profile

The second line is the SmolLM2-135M shape with a small vocabulary (the vocabulary only sizes
the embedding and the head, which LMAM does not touch; it keeps the 2-core export short).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import modapt
import onnx
import onnxruntime
import torch
from modapt_export import export_onnx
from modapt_export.onnx_io import make_inputs
from modapt_export.ort_model import node_times


def build(args, variant: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048, pad_token_id=0,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if variant == "lmam":
        modapt.apply(model, {"adapter": [{"method": "lmam", "r": 2, "n": args.n, "init": "random"}]})
    return model


def op_histogram(model_proto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model_proto.graph.node)


def session(path: Path, threads: int, optimized: Path | None = None, profile: Path | None = None):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)  # not the current directory
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds_for(config, batch: int, seq: int, past: int) -> dict:
    feeds = make_inputs("causal-lm", config, batch, seq, past=past, padding="left" if batch > 1 else "none")
    return {k: v.numpy() for k, v in feeds.items()}


def profile_by_op(sess, feeds, repeats: int) -> dict[str, float]:
    """Mean µs per run spent in each op type (ORT's node events)."""
    for _ in range(repeats):
        sess.run(None, feeds)
    return {op: entry["us"] for op, entry in node_times(sess.end_profiling(), repeats).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--n", type=int, default=128, help="LMAM map length")
    parser.add_argument("--shapes", nargs="+", default=["1x64", "8x512"], help="BATCHxSEQ prefill shapes")
    parser.add_argument("--decode-past", type=int, default=64, help="past length of the timed decode step (batch 1)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="time per op type with ORT's profiler")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--reuse", nargs="*", default=[], choices=["base", "lmam"],
                        help="variants whose export in --workdir is kept (same sizes; the weights are seeded)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lmam-graph-"))
    torch.set_num_threads(args.threads)
    result = {"args": vars(args), "graphs": {}, "latency": [], "profile": {}}
    sessions, config = {}, None
    for variant in ("base", "lmam"):
        model = build(args, variant)
        config = model.config
        start = time.perf_counter()
        if variant in args.reuse:
            manifest = json.loads((workdir / variant / "modapt_export.json").read_text())
        else:
            manifest = export_onnx(model, workdir / variant, "causal-lm", overwrite=True)
        seconds = manifest.get("export_seconds", time.perf_counter() - start)
        path = workdir / variant / "model.onnx"
        written = onnx.load(str(path), load_external_data=False)
        optimized_path = workdir / f"{variant}-ort-optimized.onnx"
        sessions[variant] = session(path, args.threads, optimized_path)
        optimized = onnx.load(str(optimized_path), load_external_data=False)
        result["graphs"][variant] = {"nodes": len(written.graph.node), "ort_nodes": len(optimized.graph.node),
                                     "ops": op_histogram(written), "ort_ops": op_histogram(optimized),
                                     "export_s": round(seconds, 1),
                                     "max_abs_error": manifest["verification"]["max_abs_error"]}
        print(f"{variant}: {len(written.graph.node)} nodes ({len(optimized.graph.node)} after ORT), "
              f"export {seconds:.0f} s, max abs error {manifest['verification']['max_abs_error']:.2g}", flush=True)
        del model

    base, lmam = result["graphs"]["base"], result["graphs"]["lmam"]
    per_layer = (lmam["nodes"] - base["nodes"]) / args.layers
    per_layer_ort = (lmam["ort_nodes"] - base["ort_nodes"]) / args.layers
    print(f"\nextra nodes per adapted layer: {per_layer:g} as written, {per_layer_ort:g} after ORT's optimisation")
    for key in ("ops", "ort_ops"):
        extra = {op: (lmam[key][op] - base[key].get(op, 0)) / args.layers for op in lmam[key]
                 if lmam[key][op] != base[key].get(op, 0)}
        print(f"  {'written' if key == 'ops' else 'after ORT'}: {dict(sorted(extra.items()))}")
    result["extra_nodes_per_layer"] = per_layer
    result["extra_ort_nodes_per_layer"] = per_layer_ort

    cases = [(f"prefill {b}x{s}", feeds_for(config, int(b), int(s), 0))
             for b, s in (shape.split("x") for shape in args.shapes)]
    cases.append((f"decode 1x1 past {args.decode_past}", feeds_for(config, 1, 1, args.decode_past)))
    print(f"\nONNX Runtime CPU, {args.threads} thread(s), median of {args.repeats} (interleaved)\n")
    print("| case | base ms | lmam ms | lmam / base |")
    print("|---|---|---|---|")
    for name, feeds in cases:
        times = {"base": [], "lmam": []}
        for variant in times:
            sessions[variant].run(None, feeds)
        for _ in range(args.repeats):
            for variant, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, feeds)
                times[variant].append((time.perf_counter() - start) * 1e3)
        b_ms, l_ms = statistics.median(times["base"]), statistics.median(times["lmam"])
        result["latency"].append({"case": name, "base_ms": b_ms, "lmam_ms": l_ms})
        print(f"| {name} | {b_ms:.2f} | {l_ms:.2f} | {l_ms / b_ms:.3f} |", flush=True)

    if args.profile:
        name, feeds = cases[0]
        for variant in ("base", "lmam"):
            sess = session(workdir / variant / "model.onnx", args.threads, profile=workdir / f"profile-{variant}")
            result["profile"][variant] = profile_by_op(sess, feeds, args.repeats)
        print(f"\nORT profiler, {name}: µs per run by op type (lmam − base, the largest differences)\n")
        print("| op | base µs | lmam µs | difference |")
        print("|---|---|---|---|")
        ops = set(result["profile"]["base"]) | set(result["profile"]["lmam"])
        diffs = sorted(ops, key=lambda op: -abs(result["profile"]["lmam"].get(op, 0) - result["profile"]["base"].get(op, 0)))
        for op in diffs[:12]:
            b, m = result["profile"]["base"].get(op, 0.0), result["profile"]["lmam"].get(op, 0.0)
            print(f"| {op} | {b:.0f} | {m:.0f} | {m - b:+.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=dict) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
