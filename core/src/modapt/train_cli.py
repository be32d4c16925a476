"""``modapt train``: fine-tune a model with a recipe (the engine is :mod:`modapt.trainer`).

Everything that can be wrong with the arguments (a missing file, an unknown column, a recipe
that targets nothing in this model) is reported before training starts.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from . import embedded, text_data
from .errors import ModaptError


def configure(parser: argparse.ArgumentParser) -> None:
    from .trainer import PRECISIONS, SCHEDULERS

    # every option says its default in --help (the parser is built by modapt.cli)
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--recipe", required=True, help="recipe file (.toml, .json, .yaml)")
    parser.add_argument("--model", default=embedded.SMOLLM2,
                        help=f"a local transformers model directory, or '{embedded.SMOLLM2}' (the embedded default)")
    parser.add_argument("--data", default=embedded.ROTTEN_TOMATOES,
                        help="CSV/JSONL file (optionally .gz/.bz2), a saved datasets folder (a DatasetDict keeps "
                             "its splits), a folder of train/validation/test files (kept as they are), or "
                             f"'{embedded.ROTTEN_TOMATOES}'; a single set is split 76/12/12 by --seed")
    parser.add_argument("--out", required=True, help="output folder (best/, last/, metrics.jsonl, curves.png, "
                                                     "checkpoints/ for --resume)")
    parser.add_argument("--task", default="sequence-classification", choices=["sequence-classification", "causal-lm"],
                        help="what the model is trained to do")
    parser.add_argument("--text-column", default="text", help="the column holding the text")
    parser.add_argument("--label-column", default="label", help="the column holding the class (classification)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="passes over the training split (None: 1)")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per micro-batch (per process)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches accumulated per optimizer step (effective batch: batch-size x this)")
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="clip the gradients' global L2 norm to this before each step (0: no clipping)")
    parser.add_argument("--warmup", type=float, default=0.05,
                        help="fraction of the steps with a linear learning-rate warm-up")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="linear",
                        help="learning-rate shape after the warm-up (linear and cosine decay to 0)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="autocast precision (None: bf16 on a CUDA GPU that has it, else fp32; fp16 needs CUDA)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, ~30%% more time")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (longer ones are cut)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the shuffling and the init")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="evaluate (and keep best/, write a checkpoint) every N steps; 0: at the end only")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most N validation examples")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                        help="continue an interrupted run: from checkpoint DIR, or without DIR from the latest "
                             "checkpoint in --out/checkpoints (same options as the first run)")
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

    for name in ("lr", "batch_size", "max_length", "grad_accum"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise ModaptError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")
    for name in ("epochs", "steps", "eval_every", "limit", "eval_limit", "max_grad_norm"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ModaptError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not math.isfinite(args.warmup) or not 0 <= args.warmup <= 1:
        raise ModaptError(f"--warmup must be a fraction of the steps in [0, 1], got {args.warmup}")
    if args.limit == 0:
        raise ModaptError("--limit 0 leaves no training examples: give at least 1")
    out = Path(args.out)
    resume = _resume_checkpoint(out, args.resume) if args.resume else None
    if resume is None:
        _refuse_earlier_run(out, args.overwrite)
    recipe = parse_recipe(args.recipe)  # recipe errors before anything heavy is loaded
    label_column = None if args.task == "causal-lm" else args.label_column
    train_set, val_set, test_set, how = text_data.load_splits(args.data, args.seed, text_column=args.text_column,
                                                              label_column=label_column, task=args.task)
    if args.limit is not None:
        train_set = train_set.subset(range(min(args.limit, len(train_set))))
    if len(train_set) == 0:  # checked here, before the model is loaded
        raise ModaptError(f"{args.data}: no training examples after the split ({how})")
    print(f"data: {how}: {len(train_set)} train / {len(val_set)} validation / {len(test_set)} test")
    num_labels = max(2, len(train_set.label_names))
    from . import quantized

    load_kwargs = quantized.load_kwargs(args.quantize) if args.quantize else {}
    model, tokenizer = embedded.load_model(args.model, args.task, num_labels, **load_kwargs)
    if args.quantize:
        quantized.prepare_for_kbit_training(model, gradient_checkpointing=True)
    from .apply import apply

    apply(model, recipe)  # targets are checked against this model before the first step
    import torch

    if torch.cuda.is_available() and not args.quantize:  # the Trainer would move it; the evaluation before too
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    config = TrainConfig(epochs=args.epochs if args.epochs is not None else 1.0, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                         eval_every=args.eval_every, eval_limit=args.eval_limit, task=args.task,
                         progress=not args.no_progress, precision=args.precision, grad_accum=args.grad_accum,
                         max_grad_norm=args.max_grad_norm, warmup=args.warmup, scheduler=args.scheduler,
                         gradient_checkpointing=args.gradient_checkpointing or bool(args.quantize),
                         resume=str(resume) if resume else None)
    if resume is not None:
        print(f"resuming from {resume}")
    else:
        before = evaluate(model, tokenizer, val_set, config)
        print("before training: " + ", ".join(f"val {k} {v:.4f}" for k, v in before.items()))
    summary = train(model, tokenizer, recipe, train_set, val_set, args.out, config)
    if summary["interrupted"]:
        print(f"interrupted at step {summary['steps']}: adapter saved to {summary['last_adapter']}; "
              f"continue with --resume (checkpoint {summary['checkpoint']})")
        return 130
    print("after training: " + ", ".join(f"val {k} {v:.4f}" for k, v in summary["final"].items()))
    curves = summary["plot"] or "not drawn (matplotlib is missing: pip install 'modapt[train]')"
    print(f"best adapter: {summary['best_adapter']} (step {summary['best_step']}); curves: {curves}")
    return 0


def _resume_checkpoint(out: Path, resume: str) -> Path:
    """The checkpoint folder ``--resume`` names (``latest``: the newest in ``--out/checkpoints``)."""
    from .trainer import latest_checkpoint

    if resume == "latest":
        found = latest_checkpoint(out)
        if found is None:
            raise ModaptError(f"--resume: no checkpoint in {out / 'checkpoints'} to continue from "
                              "(a run writes one every --eval-every steps, at Ctrl-C and at its end)")
        return Path(found)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ModaptError(f"--resume {resume}: not a training checkpoint (no trainer_state.json)")
    return path


def _refuse_earlier_run(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` holding an earlier run (its best/, last/ or metrics.jsonl) unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise ModaptError(f"--out {out}: exists and is not a folder")
    earlier = [name for name in ("best", "last", "metrics.jsonl") if (out / name).exists()]
    if earlier and not overwrite:
        raise ModaptError(f"--out {out}: holds an earlier run ({', '.join(earlier)}); "
                          "pass --overwrite to replace it or choose another folder")
