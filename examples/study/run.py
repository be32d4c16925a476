"""A small-scale reproduction of the papers' claims on SmolLM2-135M and Rotten Tomatoes.

Every run: the same seeded split (modapt.text_data.SPLIT), the same budget (--epochs over the
training split, batch 32, 64 tokens), the same optimiser (AdamW, linear warm-up 5 % and decay,
--lr), the classification head trained in full; only the adapter differs. Results are appended
to a JSONL file as each run ends, so an interrupted study keeps what it finished.

    python examples/study/run.py --runs lora:1,lora:8,lomap:8 --seeds 0 --out docs/study
    python examples/study/run.py --report docs/study/runs.jsonl      # table + plot for docs/results.md

The tuned comparison (``--sweep``): per method × rank, the lr is chosen from ``--lrs`` (default
1e-4, 3e-4, 1e-3, 3e-3) on the validation split only, with seed 0; then the other ``--seeds`` run
at the chosen lr (seed 0's tuning run is reused); ``--epochs`` (3 for the sweep) with the epoch
chosen on validation (test accuracy reported at that epoch). One lr for every adapter tensor:
MAP's α/β and LMAM's tensors share the grid (no separate lr). Resumable from
``OUT/sweep.jsonl``; ``--parallel N`` runs N cells at once, each in its own process (one GPU).

    python examples/study/run.py --sweep --runs lora:1,lomap:1 --seeds 0,1,2 --epochs 3 --parallel 8
    python examples/study/run.py --sweep-report docs/study/sweep.jsonl   # tuned table + val-acc/lr plot

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

import modapt
import torch
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
    per_epoch = max(1, int(len(train_set) / config.batch_size))  # steps of one epoch
    epochs: list[dict] = []  # (val, test) at each epoch end, under --per-epoch
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
            if getattr(args, "per_epoch", False) and (step % per_epoch == 0 or step == total):
                with autocast:
                    epochs.append({"step": step, "val": evaluate(model, tokenizer, val_set, config)["accuracy"],
                                   "test": evaluate(model, tokenizer, test_set, config)["accuracy"]})
                model.train()
            if step >= total:
                break
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start  # includes the per-epoch evaluations under --per-epoch
    if epochs:  # the epoch chosen on validation (the first of equals); test read there, never chosen on
        best = max(range(len(epochs)), key=lambda i: (epochs[i]["val"], -i))
        val, test = {"accuracy": epochs[best]["val"]}, {"accuracy": epochs[best]["test"]}
    else:
        best = None
        with autocast:
            val = evaluate(model, tokenizer, val_set, config)
            test = evaluate(model, tokenizer, test_set, config)
    extra = {"epoch": best + 1, "val_by_epoch": [e["val"] for e in epochs],
             "test_by_epoch": [e["test"] for e in epochs]} if epochs else {}
    return {"method": method, "r": r, "seed": seed, "steps": total, "epochs": args.epochs, "lr": args.lr, **extra,
            "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"],
            "loss_auc": sum(losses) / len(losses),  # area under the loss curve per step (same steps for all)
            "final_loss": statistics.mean(losses[-20:]), "trainable": sum(p.numel() for p in params),
            "step_ms": 1000 * seconds / total, "device": device}


def claims(cells: dict[tuple, list[dict]]) -> list[str]:
    """The three claims' numbers, wherever both sides of a comparison ran (means over seeds).

    LoMAP vs LoRA and LoRA+LMAM vs LoRA: test-accuracy difference in points, with the seeds'
    spread (std of the per-seed differences when both ran the same seeds). LoRMA vs LoRA: the
    relative change of the loss AUC (the paper's Table 5 reports 30-52 % lower).
    """
    def by_seed(method, r):
        return {row["seed"]: row for row in cells.get((method, r), [])}

    out = []
    ranks = sorted({r for (_, r) in cells})
    for name, method, key in [("LoMAP - LoRA", "lomap", "test_accuracy"),
                              ("LoMAP (paper init) - LoRA", "lomap-paper", "test_accuracy"),
                              ("LoRA+LMAM - LoRA", "lora+lmam", "test_accuracy"),
                              ("AdaLoMAP - AdaLoRA", "adalomap", "test_accuracy")]:
        base_method = "adalora" if method == "adalomap" else "lora"
        for r in ranks:
            a, b = by_seed(method, r), by_seed(base_method, r)
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            diffs = [100 * (a[s][key] - b[s][key]) for s in seeds]
            spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
            out.append(f"- {name}, r = {r}: {statistics.mean(diffs):+.1f}{spread} points of test accuracy "
                       f"({len(seeds)} paired seed{'s' * (len(seeds) > 1)})")
    for method in ("lorma-plus", "lorma-pi"):
        for r in ranks:
            a, b = by_seed(method, r), by_seed("lora", r)
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            changes = [100 * (a[s]["loss_auc"] / b[s]["loss_auc"] - 1) for s in seeds]
            spread = f" ± {statistics.stdev(changes):.1f}" if len(changes) > 1 else ""
            out.append(f"- {method} vs LoRA, r = {r}: loss AUC {statistics.mean(changes):+.1f}{spread} % "
                       f"({len(seeds)} paired seed{'s' * (len(seeds) > 1)})")
    return out


def step_ms(runs: list[dict]) -> str:
    """Mean step time of the runs that had the GPU to themselves ("–" if none did: under
    ``--parallel`` the processes share it, and their step times measure the contention)."""
    alone = [x["step_ms"] for x in runs if x.get("concurrent", 1) == 1]
    return f"{statistics.mean(alone):.0f}" if alone else "–"


def percent(values: list[float]) -> str:
    """Mean of fractions as a percentage, with the standard deviation when there are several."""
    return f"{100 * statistics.mean(values):.1f}" + (f" ± {100 * statistics.stdev(values):.1f}"
                                                     if len(values) > 1 else "")


def report(path: Path, out_md: Path | None) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "error" not in row]
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["method"], row["r"]), []).append(row)

    lines = ["| method | r | seeds | test acc % | val acc % | loss AUC | trainable | step ms (alone) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, r), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {method} | {r} | {len(runs)} | {percent([x['test_accuracy'] for x in runs])} | "
                     f"{percent([x['val_accuracy'] for x in runs])} | "
                     f"{statistics.mean(x['loss_auc'] for x in runs):.4f} | {runs[0]['trainable']:,} | "
                     f"{step_ms(runs)} |")
    text = "\n".join(lines + [""] + claims(cells))
    if out_md is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            # one group per method, one bar per rank (mean over seeds, ± std), every seed as a dot:
            # a seed that failed (LoRMAπ r = 8) shows as such instead of hiding in a mean
            methods = sorted({m for m, r in cells if r > 0}, key=lambda m: list(dict.fromkeys(
                k[0] for k in sorted(cells, key=lambda k: (k[1], k[0])))).index(m))
            ranks = sorted({r for _, r in cells if r > 0})
            width = 0.8 / len(ranks)
            fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods)), 3.8))
            low = 100.0
            for j, r in enumerate(ranks):
                xs, means, stds, dots = [], [], [], []
                for i, m in enumerate(methods):
                    if (m, r) not in cells:
                        continue
                    accs = [100 * x["test_accuracy"] for x in cells[(m, r)]]
                    xs.append(i + (j - (len(ranks) - 1) / 2) * width)
                    means.append(statistics.mean(accs))
                    stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
                    dots += [(xs[-1], a) for a in accs]
                    low = min(low, *accs)
                ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"r = {r}")
                ax.scatter([d[0] for d in dots], [d[1] for d in dots], s=6, color="black", zorder=3)
            floor = [100 * x["test_accuracy"] for x in cells.get(("head", 0), [])]
            if floor:
                ax.axhline(statistics.mean(floor), color="grey", linestyle="--", linewidth=1,
                           label="head only")
            ax.set_xticks(range(len(methods)), methods, rotation=30)
            ax.set_ylim(low - 2, 90)
            ax.set_ylabel("test accuracy % (dots: seeds)")
            ax.legend(ncol=len(ranks) + 1, fontsize=8, loc="lower left")
            fig.tight_layout()
            fig.savefig(out_md.with_suffix(".png"), dpi=100)
            plt.close(fig)
        except ImportError:
            pass
        out_md.write_text(text + "\n")
    return text


def finished(results: Path, with_lr: bool = False) -> set[tuple]:
    """(method, r, seed) of the cells already in ``results`` (errors are not results); with their
    lr appended when ``with_lr`` (the sweep runs one cell at several lrs)."""
    if not results.exists():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(row["method"], row["r"], row["seed"], *((row["lr"],) if with_lr else ()))
            for row in rows if "error" not in row}


SWEEP_LRS = "1e-4,3e-4,1e-3,3e-3"
SWEEP_FILE = "sweep.jsonl"


def chosen_lrs(rows: list[dict]) -> dict[tuple[str, int], float]:
    """(method, r) -> the lr of the best seed-0 validation accuracy (its best epoch); ties go to the smaller lr."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for row in rows:
        if row["seed"] != 0 or "error" in row:
            continue
        key, score = (row["method"], row["r"]), (row["val_accuracy"], -row["lr"])
        if key not in best or score > best[key]:
            best[key] = score
    return {key: -score[1] for key, score in best.items()}


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sweep(args, argv: list[str]) -> int:
    """The lr sweep: seed 0 at every lr of ``--lrs`` per cell, then the other seeds at the chosen lr.

    Each run is a child process (``--parallel`` at a time) writing one line to OUT/sweep.jsonl;
    finished (method, r, seed, lr) runs are skipped, so an interrupted sweep resumes.
    """
    out = Path(args.out)
    results = out / SWEEP_FILE
    lrs = [float(x) for x in args.lrs.split(",")]
    cells = [(m, int(r)) for m, r in (cell.split(":") for cell in args.runs.split(","))]
    seeds = [int(x) for x in args.seeds.split(",")]
    keep = _strip(argv, {"--runs", "--seeds", "--parallel", "--sweep", "--lr", "--lrs", "--redo"})
    extra = ["--per-epoch", "--results", SWEEP_FILE]
    tune = [(m, r, 0, lr) for m, r in cells for lr in lrs]
    failed = _pool(tune, args, keep, extra, finished(results, with_lr=True))
    chosen = chosen_lrs(_read_rows(results))
    final = [(m, r, seed, chosen[(m, r)]) for seed in seeds if seed != 0 for m, r in cells if (m, r) in chosen]
    failed += _pool(final, args, keep, extra, finished(results, with_lr=True))
    print(sweep_report(results, out / "sweep.md"))
    return 1 if failed else 0


def _strip(argv: list[str], skip: set[str]) -> list[str]:
    """argv without the options in ``skip`` (and their values)."""
    keep, it = [], iter(argv)
    flags = {"--sweep", "--redo", "--per-epoch"}
    for a in it:
        name = a.split("=")[0]
        if name in skip:
            if "=" not in a and name not in flags:
                next(it, None)
            continue
        keep.append(a)
    return keep


def _pool(jobs: list[tuple], args, keep: list[str], extra: list[str], done: set) -> int:
    """Run each (method, r, seed, lr) not in ``done`` as a child process, ``--parallel`` at a time; the failures."""
    import os
    import subprocess

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    jobs = [j for j in jobs if args.redo or j not in done]
    env = dict(os.environ, OMP_NUM_THREADS="1", MODAPT_STUDY_CONCURRENT=str(args.parallel))
    running, failed = [], 0
    while jobs or running:
        while jobs and len(running) < max(1, args.parallel):
            m, r, seed, lr = jobs.pop(0)
            log = open(out / "logs" / f"{m}-r{r}-s{seed}-lr{lr:g}.log", "w")
            cmd = [sys.executable, __file__, *keep, *extra, "--runs", f"{m}:{r}", "--seeds", str(seed), "--lr", str(lr)]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), (m, r, seed, lr)))
            print(f"started {m}:{r} seed {seed} lr {lr:g}", flush=True)
        time.sleep(0.2)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                failed += proc.returncode != 0
                print(f"finished {job[0]}:{job[1]} seed {job[2]} lr {job[3]:g} (exit {proc.returncode})", flush=True)
    return failed


def sweep_report(path: Path, out_md: Path | None) -> str:
    """The tuned table (each cell at its chosen lr, mean ± std over seeds), the paired verdicts at
    those lrs, and a plot of seed-0 validation accuracy against lr per method (``OUT/sweep.png``)."""
    rows = [row for row in _read_rows(path) if "error" not in row]
    chosen = chosen_lrs(rows)
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        if chosen.get((row["method"], row["r"])) == row["lr"]:
            cells.setdefault((row["method"], row["r"]), []).append(row)

    lines = ["| method | r | lr (chosen on val) | seeds | test acc % | val acc % | loss AUC | epochs chosen |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, r), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {method} | {r} | {chosen[(method, r)]:g} | {len(runs)} | "
                     f"{percent([x['test_accuracy'] for x in runs])} | {percent([x['val_accuracy'] for x in runs])} | "
                     f"{statistics.mean(x['loss_auc'] for x in runs):.4f} | "
                     f"{','.join(str(x.get('epoch', '-')) for x in sorted(runs, key=lambda x: x['seed']))} |")
    text = "\n".join(lines + [""] + claims(cells))
    if out_md is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 3.8))
            for method, r in sorted({(x["method"], x["r"]) for x in rows}, key=lambda k: (k[1], k[0])):
                pts = sorted((x["lr"], 100 * x["val_accuracy"]) for x in rows
                             if (x["method"], x["r"], x["seed"]) == (method, r, 0))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} r={r}")
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("validation accuracy % (seed 0, best epoch)")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            fig.savefig(out_md.with_suffix(".png"), dpi=100)
            plt.close(fig)
        except ImportError:
            pass
        out_md.write_text(text + "\n")
    return text


def run_parallel(args, argv: list[str]) -> int:
    """Every (cell, seed) not yet in runs.jsonl in a child process, ``--parallel`` at a time.

    A process per cell also confines a CUDA fault (which poisons its process's context) to its
    own cell. The slowest methods start first so that the pool drains evenly. Children's logs:
    ``OUT/logs/<method>-r<r>-s<seed>.log``.
    """
    import os
    import subprocess

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    done = set() if args.redo else finished(out / "runs.jsonl")
    slow_first = ["adalomap", "lomap", "lomap-paper", "dora", "lorma-pi", "adalora", "lora+lmam"]
    jobs = [(m, int(r), int(seed)) for seed in args.seeds.split(",") for m, r in
            (cell.split(":") for cell in args.runs.split(","))]
    jobs = [j for j in jobs if j not in done]
    jobs.sort(key=lambda j: (slow_first.index(j[0]) if j[0] in slow_first else len(slow_first), -j[1]))
    keep = []  # the parent's arguments minus those it decides per child
    skip = {"--runs", "--seeds", "--parallel"}
    it = iter(argv)
    for a in it:
        if a.split("=")[0] in skip:
            if "=" not in a:
                next(it, None)
            continue
        keep.append(a)
    env = dict(os.environ, OMP_NUM_THREADS="1", MODAPT_STUDY_CONCURRENT=str(args.parallel))
    running: list[tuple[subprocess.Popen, tuple]] = []
    failed = 0
    while jobs or running:
        while jobs and len(running) < args.parallel:
            m, r, seed = jobs.pop(0)
            log = open(out / "logs" / f"{m}-r{r}-s{seed}.log", "w")
            cmd = [sys.executable, __file__, *keep, "--runs", f"{m}:{r}", "--seeds", str(seed)]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), (m, r, seed)))
            print(f"started {m}:{r} seed {seed}", flush=True)
        time.sleep(1.0)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                failed += proc.returncode != 0
                print(f"finished {job[0]}:{job[1]} seed {job[2]} (exit {proc.returncode})", flush=True)
    return 1 if failed else 0


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
    parser.add_argument("--parallel", type=int, default=1,
                        help="run K cells at once, each in a process of its own (one GPU serves several: "
                             "this regime is launch-bound); step times are then under contention")
    parser.add_argument("--redo", action="store_true", help="rerun cells already in runs.jsonl")
    parser.add_argument("--sweep", action="store_true",
                        help="tune the lr per cell on validation (seed 0, --lrs), then run --seeds at the chosen lr")
    parser.add_argument("--lrs", default=SWEEP_LRS, help="the sweep's lr grid (every adapter tensor shares it)")
    parser.add_argument("--sweep-report", default=None, help="aggregate a sweep.jsonl and exit")
    parser.add_argument("--per-epoch", action="store_true",
                        help="evaluate at each epoch end; report the epoch best on validation")
    parser.add_argument("--results", default="runs.jsonl", help="results file name inside --out")
    args = parser.parse_args(argv)
    if args.report:
        print(report(Path(args.report), Path(args.report).with_name("table.md")))
        return 0
    if args.sweep_report:
        print(sweep_report(Path(args.sweep_report), Path(args.sweep_report).with_name("sweep.md")))
        return 0
    if args.sweep:
        return run_sweep(args, argv if argv is not None else sys.argv[1:])
    if args.parallel > 1:
        return run_parallel(args, argv if argv is not None else sys.argv[1:])
    import os

    args.concurrent = int(os.environ.get("MODAPT_STUDY_CONCURRENT", "1"))
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
    results = out / args.results
    done = set() if args.redo else finished(results, with_lr=args.per_epoch)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for cell in args.runs.split(","):
            method, r = cell.split(":")
            if (method, int(r), seed, *((args.lr,) if args.per_epoch else ())) in done:
                continue
            try:
                row = run_one(base, tokenizer, (train_set, val_set, test_set), method, int(r), seed, args, device)
            except Exception as exc:  # one failing cell must not lose the study
                row = {"method": method, "r": int(r), "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
                print(json.dumps(row), flush=True)
                continue
            row["concurrent"] = args.concurrent
            with open(results, "a") as f:  # one short line per write: appends from several processes stay whole
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
