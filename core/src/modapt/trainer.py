"""``modapt train``'s engine: :class:`modapt.hf_callback.ModaptTrainer` (``transformers.Trainer``).

It knows no method: AdaLoRA's regulariser and rank allocation, MAP's stepwise schedule and the
LoRMA rank monitor act through :mod:`modapt.training`'s hooks, which ``ModaptTrainer`` calls.
The Trainer brings mixed precision (bf16/fp16 autocast), gradient accumulation, clipping, the
schedule, gradient checkpointing, DDP under ``torchrun`` / ``accelerate launch`` and resumable
checkpoints (``checkpoints/checkpoint-N/``: the adapter folder plus optimizer, scheduler, RNG and
``trainer_state.json``). What this module adds around it, in ``out_dir``:

- ``best/`` (the adapter with the best validation accuracy, or lowest loss for causal-lm) and
  ``last/``, each replaced whole by :func:`modapt.save`;
- ``metrics.jsonl`` (one JSON object per optimizer step, evaluation, stop: ``event`` is
  ``config``, ``train``, ``eval``, ``diverged`` or ``end``), ``curves.png``;
- Ctrl-C (SIGINT): the Trainer stops at the next step boundary, a checkpoint for ``--resume``
  and ``last/`` are written; a second Ctrl-C stops at once;
- a non-finite adapter after an optimizer step (or a non-finite loss, which makes one) stops
  the run: the last finite adapter is put back, written to ``last/``, a ``diverged`` row names
  the step and :class:`~modapt.errors.ModaptError` is raised.

Schedules keep the loop's historical shape: warm-up over ``max(1, int(warmup * total))`` steps
with ``lr(s) = lr * (s + 1) / warm`` (the first step already learns), then ``linear`` decay to 0
at ``total``, ``cosine`` decay to 0, or ``constant``.

Fault injection (tests only, ``tests/test_train_faults.py``): :data:`FAULT_HOOK`, when set, is
called with ``(point, model)`` at ``step:<n>`` (after optimizer step n), ``save:best``,
``saved:best``, ``save:last``, ``saved:last`` and ``final-eval``, so that a test can kill the
process or send it SIGINT at each point deterministically.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import text_data
from .apply import apply, is_adapted, trainable_parameters
from .errors import ModaptError
from .persistence import save

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant")
CHECKPOINTS = "checkpoints"  # the Trainer's resumable checkpoints, under out_dir
FAULT_HOOK: Callable[[str, torch.nn.Module], None] | None = None


def _fault(point: str, model) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(point, model)


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
    precision: str | None = None  # fp32 / bf16 / fp16 autocast; None: bf16 on CUDA that has it, else fp32
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    max_grad_norm: float = 0.0  # clip the gradients' global L2 norm to this (0: no clipping)
    scheduler: str = "linear"  # after the warm-up: linear | cosine | constant
    gradient_checkpointing: bool = False
    resume: str | None = None  # a checkpoint folder to continue from


def default_precision() -> str:
    """bf16 on a CUDA device that supports it, else fp32."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def schedule(step: int, total: int, warmup: float, kind: str) -> float:
    """The learning-rate factor of optimizer step ``step`` (0-based) of ``total``."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    if kind == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, (total - step) / max(1, total - warm))


def total_steps(config: TrainConfig, train_examples: int, world: int = 1) -> int:
    """Optimizer steps of the run: ``config.steps``, or ``epochs`` over this rank's share."""
    if config.steps is not None:
        return config.steps
    per_rank = math.ceil(train_examples / world)
    per_step = config.batch_size * config.grad_accum
    return max(1, math.ceil(config.epochs * math.ceil(per_rank / per_step)))


def latest_checkpoint(out_dir) -> str | None:
    """The newest ``checkpoints/checkpoint-N`` under ``out_dir`` (``None`` when there is none)."""
    folder = Path(out_dir) / CHECKPOINTS
    found = [(int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


@torch.no_grad()
def evaluate(model, tokenizer, examples: text_data.Examples, config: TrainConfig) -> dict[str, float]:
    """Mean loss, and accuracy for classification, over ``examples`` (``eval_limit`` first ones)."""
    if config.eval_limit is not None:
        examples = examples.subset(range(min(config.eval_limit, len(examples))))
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    device = next(model.parameters()).device
    autocast = _autocast(config, device)
    for batch in text_data.batches(tokenizer, examples, config.batch_size * 2, config.max_length, task=config.task):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            out = model(**batch)
        n = batch["input_ids"].shape[0]
        total_loss += float(out.loss.float()) * n
        if config.task == "sequence-classification":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        count += n
    model.train(was_training)
    result = {"loss": total_loss / max(count, 1)}
    if config.task == "sequence-classification":
        result["accuracy"] = correct / max(count, 1)
    return result


def _autocast(config: TrainConfig, device: torch.device):
    """The autocast context of ``config.precision`` on ``device`` (a no-op for fp32 and for
    ``None``: evaluation keeps full precision unless a precision was asked for)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class _Interrupt:
    """Turns SIGINT into a flag checked at step boundaries; a second one (or one while
    ``raising``) raises KeyboardInterrupt, so a Ctrl-C during the final evaluation stops it."""

    def __init__(self):
        self.requested = False
        self.raising = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested or self.raising:
                self.requested = True
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


class _Dataset(torch.utils.data.Dataset):
    """Example indices; :class:`_Collator` tokenizes a batch of them (padding per batch)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Collator:
    def __init__(self, tokenizer, examples: text_data.Examples, config: TrainConfig):
        self.tokenizer, self.examples, self.config = tokenizer, examples, config

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return text_data.collate(self.tokenizer, self.examples, list(indices), self.config.max_length,
                                 task=self.config.task)


def _engine_class():
    from .hf_callback import ModaptTrainer

    class Engine(ModaptTrainer):
        """ModaptTrainer with the loop's historical schedule (see the module)."""

        modapt_config: TrainConfig

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                config = self.modapt_config
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer if optimizer is not None else self.optimizer,
                    lambda s: schedule(s, num_training_steps, config.warmup, config.scheduler))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return Engine


def _run_callback(run: _Run):
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """metrics.jsonl rows, evaluation and best/, the NaN/Inf stop and Ctrl-C (see the module)."""

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            run.finite = [p.detach().clone() for p in run.params]  # adapters are small: a copy per step

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if run.diverged is None and not all(bool(torch.isfinite(p).all()) for p in run.params):
                with torch.no_grad():  # back to the last finite adapter before it is saved
                    for p, kept in zip(run.params, run.finite):
                        p.copy_(kept)
                run.diverged = (f"non-finite adapter after the optimizer step at step {state.global_step} "
                                "(a non-finite loss or gradient gives one)")
                run.diverged_step = state.global_step
                control.should_training_stop = True
            return control

        def on_step_end(self, args, state, control, **kwargs):
            _fault(f"step:{state.global_step - 1}", run.model)
            if run.diverged is not None:
                control.should_training_stop = True
                control.should_save = False
            elif run.interrupt_agreed():
                control.should_training_stop = True
                control.should_save = True  # the checkpoint --resume continues from
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if run.diverged is not None or "loss" not in (logs or {}):
                return control
            step = state.global_step - 1
            elapsed = time.perf_counter() - run.start
            run.seen += run.examples_per_step
            row = {"event": "train", "step": step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                   "examples_per_s": run.seen / elapsed, "elapsed_s": elapsed}
            if "grad_norm" in logs:
                row["grad_norm"] = logs["grad_norm"]
            run.record(row)
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{row['loss']:.3f}", ex_s=f"{row['examples_per_s']:.1f}")
            done = state.global_step
            if run.config.eval_every and done % run.config.eval_every == 0 and done < state.max_steps:
                result = run.evaluate_and_keep(done)
                if result:
                    run.bar.write(f"step {done}: " + ", ".join(f"val {k} {v:.4f}" for k, v in result.items()))
            return control

    return RunCallback()


class _Run:
    """What one run of :func:`train` keeps between the Trainer's callbacks."""

    def __init__(self, model, tokenizer, val_set, out_dir: Path, config: TrainConfig, writer: bool, world: int):
        self.model, self.tokenizer, self.val_set, self.out_dir, self.config = model, tokenizer, val_set, out_dir, config
        self.writer, self.world = writer, world
        self.params = list(trainable_parameters(model).values())
        self.finite: list[torch.Tensor] = []
        self.diverged: str | None = None
        self.diverged_step: int | None = None
        self.history: list[dict] = []
        self.key = "accuracy" if config.task == "sequence-classification" else "loss"
        self.best, self.best_step = -math.inf, None
        self.seen, self.start = 0, time.perf_counter()
        self.examples_per_step = config.batch_size * config.grad_accum
        self.interrupt = _Interrupt()
        mode = "a" if config.resume else "w"
        self.metrics = open(out_dir / "metrics.jsonl", mode, encoding="utf-8") if writer else open(os.devnull, "w")
        self.bar = _progress(1, False)

    def record(self, row: dict) -> None:
        self.history.append(row)
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def interrupt_agreed(self) -> bool:
        """Whether any rank got Ctrl-C (all ranks must stop at the same step boundary)."""
        if self.world == 1:
            return self.interrupt.requested
        flag = torch.tensor([float(self.interrupt.requested)], device=_collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def evaluate_and_keep(self, step: int) -> dict:
        if not self.writer:  # the other ranks go on and wait for rank 0 in the next gradient all-reduce
            return {}
        result = evaluate(self.model, self.tokenizer, self.val_set, self.config)
        self.record({"event": "eval", "step": step, **{f"val_{k}": v for k, v in result.items()}})
        score = result[self.key] if self.key == "accuracy" else -result[self.key]
        if score > self.best:
            self.best, self.best_step = score, step
            _fault("save:best", self.model)
            save(self.model, self.out_dir / "best")
            _fault("saved:best", self.model)
        return result


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _training_arguments(config: TrainConfig, out_dir: Path, total: int):
    from transformers import TrainingArguments

    precision = config.precision or default_precision()
    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise ModaptError("--precision fp16 needs a CUDA device (fp16 autocast with loss scaling); "
                          "on CPU use bf16 or fp32")
    save_every = config.eval_every if config.eval_every and config.eval_every < total else total
    return TrainingArguments(
        output_dir=str(out_dir / CHECKPOINTS), max_steps=total, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, bf16=precision == "bf16", fp16=precision == "fp16",
        activation_checkpointing=config.gradient_checkpointing, seed=config.seed, data_seed=config.seed,
        logging_strategy="steps", logging_steps=1, logging_nan_inf_filter=False, save_strategy="steps",
        save_steps=save_every, save_total_limit=1, eval_strategy="no", report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not cuda,
        ddp_find_unused_parameters=False, optim="adamw_torch", adam_epsilon=1e-8)


def _construct(model, args, train_set, tokenizer, config: TrainConfig, run: _Run):
    """The engine. The Trainer refuses a model marked quantized (a 4-bit base, or a GGUF file
    dequantized at load) unless PEFT adapters are attached; modapt's are, so the marker PEFT sets
    is raised while the Trainer checks, and put back (save_pretrained reads it)."""
    marker = "_hf_peft_config_loaded"
    quantized = getattr(model, "is_quantized", False) and not getattr(model, marker, False)
    if quantized:
        setattr(model, marker, True)
    try:
        return _engine_class()(model=model, args=args, train_dataset=_Dataset(len(train_set)),
                               data_collator=_Collator(tokenizer, train_set, config),
                               callbacks=[_run_callback(run)])
    finally:
        if quantized:
            setattr(model, marker, False)


def train(model, tokenizer, recipe, train_set: text_data.Examples, val_set: text_data.Examples, out_dir,
          config: TrainConfig, *, log=print) -> dict:
    """Adapt ``model`` with ``recipe`` (unless already adapted) and train it; returns a summary.

    Launched by ``torchrun`` or ``accelerate launch`` (and ``config.distributed``), every rank
    runs this: the Trainer wraps the model in DDP, each rank trains on its equal share of
    ``train_set`` (so ``batch_size`` is per rank), and rank 0 alone evaluates, logs and saves;
    the summary is returned on every rank. ``config.resume``: a checkpoint folder to continue
    from (optimizer, schedule, RNG and data position included).
    """
    from transformers import PrinterCallback, ProgressCallback

    out_dir = Path(out_dir)
    if config.precision is not None and config.precision not in PRECISIONS:
        raise ModaptError(f"--precision: unknown '{config.precision}'; accepted: {', '.join(PRECISIONS)}")
    if config.scheduler not in SCHEDULERS:
        raise ModaptError(f"--scheduler: unknown '{config.scheduler}'; accepted: {', '.join(SCHEDULERS)}")
    if len(train_set) == 0:  # an empty split would loop forever looking for a first batch
        raise ModaptError("the training split is empty: give more data or a larger --limit")
    if not config.distributed:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(name, None)
    world = int(os.environ.get("WORLD_SIZE", "1")) if config.distributed else 1
    total = total_steps(config, len(train_set), world)
    args = _training_arguments(config, out_dir, total)
    world, writer = args.world_size, args.process_index == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    if not is_adapted(model):
        apply(model, recipe)
    if config.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # a frozen embedding gives checkpointed blocks no grad to carry
    run = _Run(model, tokenizer, val_set, out_dir, config, writer, world)
    if config.resume and writer:  # the best score so far is that of the evaluations in metrics.jsonl
        for row in _read_history(out_dir):
            if row.get("event") == "eval" and f"val_{run.key}" in row:
                score = row[f"val_{run.key}"] if run.key == "accuracy" else -row[f"val_{run.key}"]
                if score > run.best:
                    run.best, run.best_step = score, row["step"]
    run.bar = _progress(total, config.progress and writer)
    if not writer:
        log = lambda *a, **k: None  # noqa: E731
    engine = _construct(model, args, train_set, tokenizer, config, run)
    engine.modapt_config = config
    if config.task == "sequence-classification":
        # the classification loss is a mean per micro-batch and ignores ``num_items_in_batch``: the
        # Trainer must divide by the accumulation steps itself, or the gradient is grad_accum times
        # too large (measured: 4x the loss and the gradient norm of the same batch unaccumulated)
        engine.model_accepts_loss_kwargs = False
    for noisy in (PrinterCallback, ProgressCallback):  # metrics.jsonl and our bar say it once
        engine.remove_callback(noisy)
    run.record({"event": "config", **asdict(config), "precision": config.precision or default_precision(),
                "total_steps": total, "trainable": sum(p.numel() for p in run.params),
                "train_examples": math.ceil(len(train_set) / world), "world_size": world,
                "resumed_from": config.resume})
    interrupted = False
    with run.interrupt:
        try:
            engine.train(resume_from_checkpoint=config.resume)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, the adapter as it is goes to last/
            interrupted = True
        interrupted = interrupted or (run.interrupt.requested and run.diverged is None)
        step = engine.state.global_step if run.diverged is None else run.diverged_step
        run.bar.close()
        if writer:  # last/ first, under the flag-only handler: a Ctrl-C now cannot cost it
            _fault("save:last", model)
            save(model, out_dir / "last")
            _fault("saved:last", model)
        final = {}
        interrupted = interrupted or (run.interrupt.requested and run.diverged is None)  # Ctrl-C while saving
        if not interrupted and run.diverged is None:
            run.interrupt.raising = True  # Ctrl-C during the final evaluation stops it; last/ is on disk
            try:
                _fault("final-eval", model)
                final = run.evaluate_and_keep(step)
            except KeyboardInterrupt:
                interrupted = True
    if run.diverged is not None:
        run.record({"event": "diverged", "step": step, "reason": run.diverged})
    run.record({"event": "end", "step": step, "interrupted": interrupted,
                "elapsed_s": time.perf_counter() - run.start})
    run.metrics.close()
    plot = _plot(run.history if not config.resume else _read_history(out_dir), out_dir / "curves.png") \
        if writer else None
    if world > 1:
        torch.distributed.barrier()  # the files are written before any rank returns
    key = run.key
    summary = {"steps": step, "interrupted": interrupted, "final": final, "best_step": run.best_step,
               "best": run.best if key == "accuracy" else -run.best, "metrics": str(out_dir / "metrics.jsonl"),
               "plot": plot, "best_adapter": str(out_dir / "best") if run.best_step is not None else None,
               "last_adapter": str(out_dir / "last"),
               "checkpoint": latest_checkpoint(out_dir)}
    log(json.dumps(summary))
    if run.diverged is not None:
        raise ModaptError(f"training stopped: {run.diverged}; the last finite adapter is in {out_dir / 'last'}")
    return summary


def _read_history(out_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl (a resumed run draws the curves of all its parts)."""
    rows = []
    path = out_dir / "metrics.jsonl"
    for line in (path.read_text(encoding="utf-8") if path.is_file() else "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the curves skip it
            continue
    return rows


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
    try:
        fig.savefig(tmp, dpi=100)
    except OSError as exc:  # matplotlib writes through a file object: the error names no file
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(tmp)) from None
    finally:
        plt.close(fig)
    tmp.replace(path)
    return str(path)
