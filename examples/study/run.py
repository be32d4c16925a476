"""A small-scale reproduction of the papers' claims on SmolLM2-135M and Rotten Tomatoes.

Every run: the same seeded split (modapt.text_data.SPLIT), the same budget (--epochs over the
training split, batch 32, 64 tokens), the same optimiser (AdamW, linear warm-up 5 % and decay,
--lr), the classification head trained in full; only the adapter differs. Results are appended
to a JSONL file as each run ends, so an interrupted study keeps what it finished.

    python examples/study/run.py --runs lora:1,lora:8,lomap:8 --seeds 0 --out docs/study
    python examples/study/run.py --report docs/study/runs.jsonl      # table + plot for docs/results.md

``--gguf`` and ``--csv`` point at the model and data files directly (the GPU machine has
neither package installed); by default they come from the embedded packages.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import modapt
from modapt import embedded, text_data
from modapt.trainer import TrainConfig, evaluate

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipe_for(method: str, r: int, total_steps: int) -> dict | None:
    """The adapter of one study cell (``None``: the floor, only the head trains)."""
    lora = {"method": "lora", "r": r, "lora_alpha": float(2 * r)}
    lmam = {"method": "lmam", "heads": 3, "r": 2, "n": 64}
    adalora = {"method": "adalora", "init_r": max(2, r + r // 2), "target_r": r, "lora_alpha": float(2 * r),
               "total_step": total_steps, "tinit": total_steps // 10, "tfinal": total_steps // 5, "deltaT": 10}
    table = {
        "head": None,
        "lora": [{**lora, "targets": LINEAR}],
        "lomap": [{"method": "map", "targets": LINEAR, "update": lora}],
        "lomap-paper": [{"method": "map", "init": "paper", "targets": LINEAR, "update": lora}],
        "dora": [{"method": "dora", "targets": LINEAR, "update": lora}],
        "lorma-plus": [{"method": "lorma", "r": r, "lora_alpha": float(r), "inflation": "plus", "targets": LINEAR}],
        "lorma-pi": [{"method": "lorma", "r": r, "lora_alpha": float(r), "inflation": "pi", "targets": LINEAR}],
        "lora+lmam": [{**lora, "targets": LINEAR}, lmam],
        "adalora": [{**adalora, "targets": LINEAR}],
        "adalomap": [{"method": "map", "targets": LINEAR, "update": adalora}],
    }
    adapters = table[method]
    return None if adapters is None else {"adapter": adapters, "modules_to_save": ["score"]}


def load_data(csv_path: str | None) -> text_data.Examples:
    if csv_path is None:
        return text_data.read_examples(embedded.ROTTEN_TOMATOES)
    rows = [r for r in text_data._rows(Path(csv_path)) if r["category"] != "plot"]
    return text_data.Examples([r["text"] for r in rows], [int(r["category"] == "fresh") for r in rows],
                              ["rotten", "fresh"])


def load_base(gguf: str | None, model_dir: str | None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model_dir:
        return embedded.load_model(model_dir, "sequence-classification", 2)
    if gguf is None:
        return embedded.load_model(embedded.SMOLLM2, "sequence-classification", 2)
    path = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(path.parent), gguf_file=path.name, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def run_one(base, tokenizer, data, method: str, r: int, seed: int, args, device: str) -> dict:
    train_set, val_set, test_set = data
    config = TrainConfig(lr=args.lr, batch_size=32, max_length=64, seed=seed, eval_every=0, progress=False)
    total = max(1, int(args.epochs * len(train_set) / config.batch_size))
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.normal_(model.score.weight, std=model.config.initializer_range)
    model.score.float()  # the head trains in full: keep its AdamW updates out of bf16 rounding
    recipe = recipe_for(method, r, total)
    if recipe is None:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("score."))
    else:
        modapt.apply(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    warm = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    losses, step, start = [], 0, time.perf_counter()
    model.train()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    while step < total:
        for batch in text_data.batches(tokenizer, train_set, 32, 64, shuffle=True, seed=seed + step):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                loss = model(**batch).loss
                if recipe is not None:
                    loss = loss + modapt.regularization_loss(model)
            loss.backward()
            if recipe is not None:
                modapt.before_optimizer_step(model, step)
            optimizer.step()
            if recipe is not None:
                modapt.after_optimizer_step(model, step)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with autocast:
        val = evaluate(model, tokenizer, val_set, config)
        test = evaluate(model, tokenizer, test_set, config)
    return {"method": method, "r": r, "seed": seed, "steps": total, "epochs": args.epochs, "lr": args.lr,
            "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"],
            "loss_auc": sum(losses) / len(losses),  # area under the loss curve per step (same steps for all)
            "final_loss": statistics.mean(losses[-20:]), "trainable": sum(p.numel() for p in params),
            "step_ms": 1000 * seconds / total, "device": device}


def report(path: Path, out_md: Path | None) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["method"], row["r"]), []).append(row)

    def ms(values):
        return f"{100 * statistics.mean(values):.1f}" + (f" ± {100 * statistics.stdev(values):.1f}"
                                                         if len(values) > 1 else "")

    lines = ["| method | r | seeds | test acc % | val acc % | loss AUC | trainable | step ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, r), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {method} | {r} | {len(runs)} | {ms([x['test_accuracy'] for x in runs])} | "
                     f"{ms([x['val_accuracy'] for x in runs])} | "
                     f"{statistics.mean(x['loss_auc'] for x in runs):.4f} | {runs[0]['trainable']:,} | "
                     f"{statistics.mean(x['step_ms'] for x in runs):.0f} |")
    text = "\n".join(lines)
    if out_md is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            names = [f"{m} r{r}" for (m, r) in sorted(cells, key=lambda k: (k[1], k[0]))]
            accs = [100 * statistics.mean(x["test_accuracy"] for x in cells[k])
                    for k in sorted(cells, key=lambda k: (k[1], k[0]))]
            fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.5))
            ax.bar(names, accs)
            ax.set_ylim(min(accs) - 3, max(accs) + 1)
            ax.set_ylabel("test accuracy %")
            ax.tick_params(axis="x", rotation=60)
            fig.tight_layout()
            fig.savefig(out_md.with_suffix(".png"), dpi=100)
            plt.close(fig)
        except ImportError:
            pass
        out_md.write_text(text + "\n")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="head:0,lora:1,lora:8,lomap:1,lomap:8", help="method:rank,...")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--model-dir", default=None, help="a local transformers model (tests)")
    parser.add_argument("--limit", type=int, default=None, help="use only N training examples (smoke runs)")
    parser.add_argument("--out", default="docs/study")
    parser.add_argument("--report", default=None, help="aggregate a runs.jsonl into a table and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(report(Path(args.report), Path(args.report).with_name("table.md")))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_base(args.gguf, args.model_dir)
    if device == "cuda":
        base.to(torch.bfloat16)
    train_set, val_set, test_set = text_data.split(load_data(args.csv), args.split_seed)
    if args.limit:
        train_set = train_set.subset(range(min(args.limit, len(train_set))))
        val_set, test_set = val_set.subset(range(min(args.limit, len(val_set)))), test_set.subset(
            range(min(args.limit, len(test_set))))
    results = out / "runs.jsonl"
    for seed in [int(s) for s in args.seeds.split(",")]:
        for cell in args.runs.split(","):
            method, r = cell.split(":")
            try:
                row = run_one(base, tokenizer, (train_set, val_set, test_set), method, int(r), seed, args, device)
            except Exception as exc:  # one failing cell must not lose the study
                row = {"method": method, "r": int(r), "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(row), flush=True)
                continue
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
