"""The plain PyTorch training loop behind ``modapt train``.

It knows no method: AdaLoRA's regulariser and rank allocation, MAP's stepwise schedule and the
LoRMA rank monitor act through :mod:`modapt.training`'s hooks. Outputs in ``out_dir``:
``best/`` (the adapter with the best validation accuracy, saved atomically), ``last/``,
``metrics.jsonl`` (one JSON object per logged step or evaluation), ``curves.png``.
Ctrl-C (SIGINT) finishes the current step, saves ``last/`` and returns with ``interrupted``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed, text_data
from .apply import apply, is_adapted, trainable_parameters
from .errors import ModaptError
from .persistence import save
from .training import after_optimizer_step, before_optimizer_step, regularization_loss


@dataclass
class TrainConfig:
    """Hyper-parameters of the loop. ``steps`` wins over ``epochs`` when both are given."""

    epochs: float = 1.0
    steps: int | None = None
    lr: float = 5e-4
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0
    eval_every: int = 100
    eval_limit: int | None = None  # evaluate on at most this many validation examples
    warmup: float = 0.05  # fraction of steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.0
    task: str = "sequence-classification"
    progress: bool = True
    # under torchrun / accelerate launch (a process group from the env vars): DDP, each rank its
    # equal share of the training data, rank 0 alone evaluates, logs and writes
    distributed: bool = True


@torch.no_grad()
def evaluate(model, tokenizer, examples: text_data.Examples, config: TrainConfig) -> dict[str, float]:
    """Mean loss, and accuracy for classification, over ``examples`` (``eval_limit`` first ones)."""
    if config.eval_limit is not None:
        examples = examples.subset(range(min(config.eval_limit, len(examples))))
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in text_data.batches(tokenizer, examples, config.batch_size * 2, config.max_length, task=config.task):
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        out = model(**batch)
        n = batch["input_ids"].shape[0]
        total_loss += float(out.loss) * n
        if config.task == "sequence-classification":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        count += n
    model.train(was_training)
    result = {"loss": total_loss / max(count, 1)}
    if config.task == "sequence-classification":
        result["accuracy"] = correct / max(count, 1)
    return result


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _Interrupt:
    """Turns the first SIGINT into a flag checked between steps; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(model, tokenizer, recipe, train_set: text_data.Examples, val_set: text_data.Examples, out_dir,
          config: TrainConfig, *, log=print) -> dict:
    """Adapt ``model`` with ``recipe`` (unless already adapted) and train it; returns a summary.

    Launched by ``torchrun`` or ``accelerate launch`` (and ``config.distributed``), every rank
    runs this: the model is wrapped in DDP (on ``cuda:LOCAL_RANK`` when there is CUDA), each rank
    trains on its equal share of ``train_set`` (so ``batch_size`` is per rank), and rank 0 alone
    evaluates, logs and saves; the summary is returned on every rank.
    """
    out_dir = Path(out_dir)
    sharded = config.distributed and distributed.init_from_env() and distributed.world_size() > 1
    writer = distributed.rank() == 0 if sharded else True
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    if not is_adapted(model):
        apply(model, recipe)
    forward = model
    if sharded:
        train_set = train_set.subset(distributed.rank_shard(len(train_set)))
        if torch.cuda.is_available():
            model.to(torch.device("cuda", torch.cuda.current_device()))
        forward = torch.nn.parallel.DistributedDataParallel(model)
        log = log if writer else (lambda *a, **k: None)
    if len(train_set) == 0:  # an empty split would loop forever looking for a first batch
        raise ModaptError("the training split is empty: give more data or a larger --limit")
    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = config.steps if config.steps is not None else max(1, math.ceil(config.epochs * steps_per_epoch))
    warm = max(1, int(config.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    metrics_path = out_dir / "metrics.jsonl"
    metrics = open(metrics_path, "w", encoding="utf-8") if writer else open(os.devnull, "w")
    history: list[dict] = []

    def record(row: dict) -> None:
        history.append(row)
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    record({"event": "config", **asdict(config), "total_steps": total,
            "trainable": sum(p.numel() for p in params), "train_examples": len(train_set)})
    best, best_step = -math.inf, None
    key = "accuracy" if config.task == "sequence-classification" else "loss"

    def evaluate_and_keep(step: int) -> dict:
        nonlocal best, best_step
        if not writer:  # the other ranks go on and wait for rank 0 in the next gradient all-reduce
            return {}
        result = evaluate(model, tokenizer, val_set, config)
        record({"event": "eval", "step": step, **{f"val_{k}": v for k, v in result.items()}})
        score = result[key] if key == "accuracy" else -result[key]
        if score > best:
            best, best_step = score, step
            save(model, out_dir / "best")
        return result

    bar = _progress(total, config.progress and writer)
    model.train()
    step, epoch, start, interrupted, seen = 0, 0, time.perf_counter(), False, 0
    diverged = None
    with _Interrupt() as interrupt:
        while step < total and not interrupted and diverged is None:
            for batch in text_data.batches(tokenizer, train_set, config.batch_size, config.max_length, shuffle=True,
                                           seed=config.seed + epoch, task=config.task):
                batch = {k: v.to(_device(model)) for k, v in batch.items()}
                out = forward(**batch)
                loss = out.loss + regularization_loss(model)
                if not torch.isfinite(loss.detach()).all():  # the adapter is still the last finite one
                    diverged = f"non-finite loss ({float(loss):g}) at step {step}"
                    break
                loss.backward()
                before_optimizer_step(model, step)
                finite = [p.detach().clone() for p in params]  # adapters are small: a copy per step
                optimizer.step()
                after_optimizer_step(model, step)
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    with torch.no_grad():  # back to the last finite adapter before it is saved
                        for p, kept in zip(params, finite):
                            p.copy_(kept)
                    diverged = f"non-finite adapter after the optimizer step at step {step}"
                    break
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                seen += batch["input_ids"].shape[0]
                elapsed = time.perf_counter() - start
                row = {"event": "train", "step": step, "loss": out.loss.item(), "lr": scheduler.get_last_lr()[0],
                       "examples_per_s": seen / elapsed, "elapsed_s": elapsed}
                record(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", ex_s=f"{row['examples_per_s']:.1f}")
                step += 1
                if config.eval_every and step % config.eval_every == 0 and step < total:
                    result = evaluate_and_keep(step)
                    if result:
                        bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in result.items()))
                if interrupt.requested:
                    interrupted = True
                    break
                if step >= total:
                    break
            epoch += 1
    bar.close()
    if writer:  # last/ first: a Ctrl-C during the final evaluation must not cost it
        save(model, out_dir / "last")
    final = {}
    if not interrupted and diverged is None:
        try:
            final = evaluate_and_keep(step)
        except KeyboardInterrupt:  # last/ is already on disk
            interrupted = True
    if diverged is not None:
        record({"event": "diverged", "step": step, "reason": diverged})
    record({"event": "end", "step": step, "interrupted": interrupted, "elapsed_s": time.perf_counter() - start})
    metrics.close()
    plot = _plot(history, out_dir / "curves.png") if writer else None
    if sharded:
        torch.distributed.barrier()  # the files are written before any rank returns
    summary = {"steps": step, "interrupted": interrupted, "final": final, "best_step": best_step,
               "best": best if key == "accuracy" else -best, "metrics": str(metrics_path), "plot": plot,
               "best_adapter": str(out_dir / "best") if best_step is not None else None,
               "last_adapter": str(out_dir / "last")}
    log(json.dumps(summary))
    if diverged is not None:
        raise ModaptError(f"training stopped: {diverged}; the last finite adapter is in {out_dir / 'last'}")
    return summary


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety; the loop runs without it
        enabled = False
    if not enabled:
        class _Quiet:
            def update(self, n): pass
            def set_postfix(self, **kw): pass
            def write(self, text): print(text)
            def close(self): pass
        return _Quiet()
    return tqdm(total=total, unit="step", dynamic_ncols=True)


def _plot(history: list[dict], path: Path) -> str | None:
    """Loss and validation curves as a PNG (matplotlib, imported here: it is an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in history if r.get("event") == "train"]
    evals = [r for r in history if r.get("event") == "eval"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax[0].plot(steps, losses, alpha=0.3, label="loss")
        ax[0].plot(steps, smooth, label=f"mean of {window}")
        ax[0].set_xlabel("step")
        ax[0].set_title("training loss")
        ax[0].legend()
    metric = "val_accuracy" if evals and "val_accuracy" in evals[0] else "val_loss"
    if evals:
        ax[1].plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o")
    ax[1].set_xlabel("step")
    ax[1].set_title(metric.replace("_", " "))
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return str(path)
