"""Which MAP initialisation trains better? Loss after N steps on a small learnable task, both inits.

Task: tiny random LLaMA (modapt.testing.tiny_llama, hidden 64, 2 layers) as a sequence
classifier; a sequence of ``--seq`` random token ids is labelled 1 when most of its ids are
below the middle of the vocabulary (a majority vote: the last position must gather the whole
sequence through attention, so the adapters have to learn it). Adapters on every linear layer
of the blocks (the paper adapts all linear layers), the classification head trained in full.
Same base model, data and optimiser (AdamW) for every method; the seeds vary the adapter init
and the batches. Prints a Markdown table: mean ± std over seeds of the training loss (mean of
the last 20 steps) and held-out loss and accuracy.

    python plugins/map/benchmarks/init_comparison.py --steps 200 --lr 1e-3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import modapt
from modapt.testing import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128


def methods(r: int) -> dict[str, dict]:
    lora = {"method": "lora", "r": r, "lora_alpha": float(2 * r)}
    return {
        "lora": {**lora, "targets": TARGETS},
        "lomap paper": {"method": "map", "init": "paper", "targets": TARGETS, "update": lora},
        "lomap identity (std 1e-3)": {"method": "map", "init": "identity", "targets": TARGETS, "update": lora},
        "lomap identity (std 1e-2)": {"method": "map", "init": "identity", "identity_std": 1e-2,
                                      "targets": TARGETS, "update": lora},
    }


def batch(n: int, seq: int, gen: torch.Generator):
    ids = torch.randint(1, VOCAB, (n, seq), generator=gen)  # no pad id (0): the last token is the summary
    labels = ((ids < VOCAB // 2).sum(1) * 2 > seq).long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def run(entry: dict, seed: int, args) -> dict[str, float]:
    model = tiny_llama(task="sequence-classification", seed=0)
    torch.manual_seed(seed)
    modapt.apply(model, {"adapter": [entry], "modules_to_save": ["score"]})
    opt = torch.optim.AdamW(modapt.trainable_parameters(model).values(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    losses = []
    model.train()
    for step in range(args.steps):
        inputs, labels = batch(args.batch, args.seq, gen)
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels)
        loss.backward()
        modapt.before_optimizer_step(model, step)
        opt.step()
        modapt.after_optimizer_step(model, step)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    inputs, labels = batch(1024, args.seq, torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(**inputs).logits
    return {"train": statistics.fmean(losses[-20:]),
            "eval": float(torch.nn.functional.cross_entropy(logits, labels)),
            "acc": float((logits.argmax(-1) == labels).float().mean()),
            "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=11)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="method labels to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # tiny matmuls: one thread is fastest, and robust on a busy machine
    print(f"tiny LLaMA majority task, r={args.r}, {args.steps} steps, lr {args.lr}, batch {args.batch}, "
          f"seq {args.seq}, seeds {args.seeds}; chance loss ln 2 = 0.693\n")
    print("| method | train loss (last 20) | eval loss | eval acc | finite |")
    print("| --- | --- | --- | --- | --- |")
    for label, entry in methods(args.r).items():
        if args.only and label not in args.only:
            continue
        t0 = time.perf_counter()
        results = [run(entry, s, args) for s in args.seeds]

        def cell(key):
            vals = [r[key] for r in results]
            return f"{statistics.fmean(vals):.3f} ± {statistics.pstdev(vals):.3f}"

        print(f"| {label} | {cell('train')} | {cell('eval')} | {cell('acc')} | "
              f"{all(r['finite'] for r in results)} |", flush=True)
        _ = time.perf_counter() - t0


if __name__ == "__main__":
    main()
