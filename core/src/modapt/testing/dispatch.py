"""Per-layer dispatch cost of a method: step time and op counts in the launch-bound regime.

Shared by the plugins' ``benchmarks/dispatch.py`` scripts. At the SmolLM2-135M shape a GPU
step waits on the CPU issuing kernels, so what a method adds per adapted layer (ops, autograd
nodes, Python) sets its cost; a LLaMA with a tiny hidden size on the CPU makes arithmetic
negligible and measures the same thing. Methods run interleaved (each once per round, medians
over rounds: drift on a shared machine hits all alike), then one profiled step per method
counts its ``aten::`` calls (nested ones included) and the extra ones per adapted layer over
the reference method.

A script supplies ``adapt(method, model, args) -> (model, extra_loss or None, after_step or None)``
and its method names, and calls :func:`main`.
"""

from __future__ import annotations

import argparse
import collections
import statistics
from collections.abc import Callable

import torch

from .step_timing import time_steps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Adapt = Callable[[str, torch.nn.Module, argparse.Namespace], tuple]


def parser(description: str, methods: list[str]) -> argparse.ArgumentParser:
    """The shape, timing and precision options every dispatch script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (each method once per round)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    p.add_argument("--methods", default=",".join(methods))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "autocast"], default="fp32")
    p.add_argument("--top", type=int, default=0, help="print the N ops the focus method adds most over the reference")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: one thread issues the ops, as on a GPU; more threads on a shared "
                        "2-core machine only add synchronisation noise)")
    return p


def build_model(args) -> torch.nn.Module:
    """A LlamaForCausalLM of the shape in ``args``, seeded random weights, on ``args.device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=max(256, args.seq), attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    if args.precision == "bf16":
        model.to(torch.bfloat16)
    return model


class Runner:
    """One method's model, optimizer and batch; ``step()`` runs forward (+ extra loss), backward,
    AdamW, the after-step hook, zero_grad."""

    def __init__(self, method: str, args, adapt: Adapt):
        self.model, self.extra_loss, self.after_step = adapt(method, build_model(args), args)
        self.model.train()
        self.count = 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # as on CUDA (its default there)
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
        self.autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16,
                                       enabled=args.precision == "autocast")

    def step(self, optimizer: bool = True) -> None:
        with self.autocast:
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            if self.extra_loss is not None:
                loss = loss + self.extra_loss()
        loss.backward()
        if not optimizer:  # forward + backward only (the "fwd+bwd" columns)
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(self.count)
        self.count += 1
        self.optimizer.zero_grad(set_to_none=True)


def op_counts(runner: Runner, optimizer: bool = True) -> collections.Counter:
    """aten op name -> calls in one training step (nested calls included); ``optimizer=False``:
    forward and backward only (on a CPU, AdamW's multi-tensor ops fall back to one op per
    parameter, which a GPU does not pay)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(optimizer)
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def main(description: str, methods: list[str], adapt: Adapt, focus: str, settings: Callable[[argparse.Namespace], str],
         extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None, argv=None) -> None:
    """Parse the options, time every method interleaved, count its ops, print the table.

    ``focus`` is the method whose added ops ``--top`` lists; ``settings(args)`` describes the
    method-specific options for the header line.
    """
    p = parser(description, methods)
    if extra_arguments is not None:
        extra_arguments(p)
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    chosen = args.methods.split(",")
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{args.device}, {args.precision}; LLaMA hidden {args.hidden}, {args.layers} layers, "
          f"batch {args.batch} x {args.seq}, {settings(args)}, {7 * args.layers} adapted layers")
    runners = {m: Runner(m, args, adapt) for m in chosen}
    for runner in runners.values():  # warm-up
        time_steps(runner.step, torch.device(args.device), 2, 0)
    rounds = {m: [] for m in chosen}
    for _ in range(args.rounds):
        for method, runner in runners.items():
            seconds, _ = time_steps(runner.step, torch.device(args.device), 0, args.steps)
            rounds[method].append(statistics.median(seconds))
    counts = {m: op_counts(r) for m, r in runners.items()}
    model_counts = {m: op_counts(r, optimizer=False) for m, r in runners.items()}
    layers = 7 * args.layers
    ref = "lora" if "lora" in chosen else chosen[0]
    ref_time = statistics.median(rounds[ref])
    print(f"{'method':12s} {'step ms':>9s} {'x ' + ref:>8s} {'step ops':>9s} {'/layer over ' + ref:>17s} "
          f"{'fwd+bwd ops':>12s} {'/layer over ' + ref:>17s}")
    for method in chosen:
        t = statistics.median(rounds[method])
        total, model = sum(counts[method].values()), sum(model_counts[method].values())
        extra = (total - sum(counts[ref].values())) / layers
        model_extra = (model - sum(model_counts[ref].values())) / layers
        print(f"{method:12s} {t * 1e3:9.2f} {t / ref_time:8.2f} {total:9d} {extra:17.1f} {model:12d} {model_extra:17.1f}")
    if args.top and focus in counts and ref in counts:
        diff = counts[focus].copy()
        diff.subtract(counts[ref])
        print(f"ops {focus} adds per adapted layer over {ref}:")
        for name, n in diff.most_common(args.top):
            print(f"  {name:40s} {n / layers:6.2f}")
