"""``modapt train``: fine-tune a model with a recipe (the loop is :mod:`modapt.trainer`).

Everything that can be wrong with the arguments (a missing file, an unknown column, a recipe
that targets nothing in this model) is reported before training starts.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import embedded, text_data
from .errors import ModaptError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe file (.toml, .json, .yaml)")
    parser.add_argument("--model", default=embedded.SMOLLM2,
                        help=f"a local transformers model directory, or '{embedded.SMOLLM2}' (the embedded default)")
    parser.add_argument("--data", default=embedded.ROTTEN_TOMATOES,
                        help=f"CSV/JSONL file, a saved datasets folder, or '{embedded.ROTTEN_TOMATOES}'")
    parser.add_argument("--out", required=True, help="output folder (best/, last/, metrics.jsonl, curves.png)")
    parser.add_argument("--task", default="sequence-classification", choices=["sequence-classification", "causal-lm"])
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None)
    length.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most N validation examples")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --out (default: refuse an --out that holds one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument("--quantize", choices=["4bit", "8bit"], default=None,
                        help="load the base quantized by bitsandbytes (4bit: nf4 + double quant) and train the "
                             "adapters on it, QLoRA-style (modapt.quantized.prepare_for_kbit_training)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from .recipe import parse_recipe
    from .trainer import TrainConfig, evaluate, train

    for name in ("lr", "batch_size", "max_length"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise ModaptError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")
    for name in ("epochs", "steps", "eval_every", "limit", "eval_limit"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ModaptError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.limit == 0:
        raise ModaptError("--limit 0 leaves no training examples: give at least 1")
    _refuse_earlier_run(Path(args.out), args.overwrite)
    recipe = parse_recipe(args.recipe)  # recipe errors before anything heavy is loaded
    label_column = None if args.task == "causal-lm" else args.label_column
    examples = text_data.read_examples(args.data, text_column=args.text_column, label_column=label_column,
                                       task=args.task)
    train_set, val_set, test_set = text_data.split(examples, args.seed)
    if args.limit is not None:
        train_set = train_set.subset(range(min(args.limit, len(train_set))))
    if len(train_set) == 0:  # checked here, before the model is loaded
        raise ModaptError(f"{args.data}: no training examples after the split ({len(examples)} rows in all)")
    num_labels = max(2, len(examples.label_names))
    from . import quantized

    load_kwargs = quantized.load_kwargs(args.quantize) if args.quantize else {}
    model, tokenizer = embedded.load_model(args.model, args.task, num_labels, **load_kwargs)
    if args.quantize:
        quantized.prepare_for_kbit_training(model, gradient_checkpointing=True)
    from .apply import apply

    apply(model, recipe)  # targets are checked against this model before the first step
    config = TrainConfig(epochs=args.epochs if args.epochs is not None else 1.0, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                         eval_every=args.eval_every, eval_limit=args.eval_limit, task=args.task,
                         progress=not args.no_progress)
    before = evaluate(model, tokenizer, val_set, config)
    print(f"before training: " + ", ".join(f"val {k} {v:.4f}" for k, v in before.items()))
    summary = train(model, tokenizer, recipe, train_set, val_set, args.out, config)
    if summary["interrupted"]:
        print(f"interrupted at step {summary['steps']}: adapter saved to {summary['last_adapter']}")
        return 130
    print(f"after training: " + ", ".join(f"val {k} {v:.4f}" for k, v in summary["final"].items()))
    curves = summary["plot"] or "not drawn (matplotlib is missing: pip install 'modapt[train]')"
    print(f"best adapter: {summary['best_adapter']} (step {summary['best_step']}); curves: {curves}")
    return 0


def _refuse_earlier_run(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` holding an earlier run (its best/, last/ or metrics.jsonl) unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise ModaptError(f"--out {out}: exists and is not a folder")
    earlier = [name for name in ("best", "last", "metrics.jsonl") if (out / name).exists()]
    if earlier and not overwrite:
        raise ModaptError(f"--out {out}: holds an earlier run ({', '.join(earlier)}); "
                          "pass --overwrite to replace it or choose another folder")
