"""AdaLoRA's per-layer dispatch cost: step time and op counts in the launch-bound regime.

At the SmolLM2-135M shape (210 adapted layers, 2048 tokens) a GPU step is bound by the CPU
issuing kernels, not by arithmetic, so what matters is the number of ops (and the Python work)
per adapted layer. On a CPU, a LLaMA with a tiny hidden size and few tokens makes arithmetic
negligible, so the CPU step time is that dispatch overhead; ``torch.profiler`` counts the ops.

Methods, each on its own copy of the same model, timed in interleaved rounds (the medians of
the rounds' medians are printed, so other jobs on a shared machine bias no method): modapt
LoRA (r = init_r), modapt AdaLoRA, PEFT LoRA, PEFT AdaLoRA (and full fine-tuning as the floor).
A step is forward + loss (+ AdaLoRA's orthogonality regulariser), backward, AdamW, the
allocation hook (``modapt.after_optimizer_step`` / PEFT's ``update_and_allocate``), zero_grad;
the schedule is the shrinking phase with deltaT = 1 (every step scores and reallocates, the
costliest), or ``--deltaT N`` / ``--tinit N`` to time the cheaper steps. Then one profiled step
per method: aten ops per step (every dispatched ``aten::`` call, nested ones included) and the
extra ops per adapted layer over modapt LoRA.

CPU proxy:  python plugins/adalora/benchmarks/dispatch.py                    (hidden 64, 30 layers, 4 x 16 tokens, fp32)
GPU (135M): python plugins/adalora/benchmarks/dispatch.py --hidden 576 --intermediate 1536 --heads 9 --kv-heads 3 \\
                --vocab 49152 --batch 32 --seq 64 --precision autocast
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["full-ft", "lora", "adalora", "peft-lora", "peft-adalora"]


def build_model(args):
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


def schedule(args) -> dict:
    return {"init_r": args.r, "target_r": max(1, args.r // 2), "lora_alpha": float(2 * args.r), "tinit": args.tinit,
            "tfinal": 0, "deltaT": args.deltaT, "total_step": 100_000}


def adapt(method, model, args):
    """(model, extra loss or None, after-step hook or None)."""
    if method == "full-ft":
        return model, None, None
    if method.startswith("peft-"):
        import peft

        if method == "peft-lora":
            config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)
            return peft.get_peft_model(model, config), None, None
        config = peft.AdaLoraConfig(target_modules=TARGETS, **schedule(args))
        model = peft.get_peft_model(model, config)
        return model, None, model.base_model.update_and_allocate
    import modapt

    if method == "lora":
        entry = {"method": "lora", "r": args.r, "lora_alpha": 2.0 * args.r, "targets": TARGETS}
        return modapt.apply(model, {"adapter": [entry]}), None, None
    model = modapt.apply(model, {"adapter": [{"method": "adalora", "targets": TARGETS, **schedule(args)}]})
    return model, (lambda: modapt.regularization_loss(model)), (lambda step: modapt.after_optimizer_step(model, step))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One method's model, optimizer and batch; ``step()`` runs forward, backward, AdamW, zero_grad."""

    def __init__(self, method, args):
        self.model, self.extra_loss, self.after_step = adapt(method, build_model(args), args)
        self.count = 0
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # as on CUDA (its default there)
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
        self.autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16,
                                       enabled=args.precision == "autocast")

    def step(self, optimizer=True):
        with self.autocast:
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            if self.extra_loss is not None:
                loss = loss + self.extra_loss()
        loss.backward()
        if not optimizer:  # forward + backward only (the profile's "model" column)
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(self.count)
        self.count += 1
        self.optimizer.zero_grad(set_to_none=True)


def op_counts(runner, optimizer=True) -> collections.Counter:
    """aten op name -> calls in one training step (nested calls included); ``optimizer=False``:
    forward and backward only (on a CPU, AdamW's multi-tensor ops fall back to one op per
    parameter, which a GPU does not pay, so DoRA's extra magnitude vector shows there)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(optimizer)
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tinit", type=int, default=0, help="AdaLoRA warm-up steps (no pruning before)")
    parser.add_argument("--deltaT", type=int, default=1, help="AdaLoRA steps between reallocations")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (each method once per round)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "autocast"], default="fp32")
    parser.add_argument("--top", type=int, default=0, help="print the N ops AdaLoRA adds most over LoRA")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: one thread issues the ops, as on a GPU; more threads on a shared "
                             "2-core machine only add synchronisation noise)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{args.device}, {args.precision}; LLaMA hidden {args.hidden}, {args.layers} layers, "
          f"batch {args.batch} x {args.seq}, init_r {args.r}, tinit {args.tinit}, deltaT {args.deltaT}, "
          f"{7 * args.layers} adapted layers")
    runners = {m: Runner(m, args) for m in methods}
    for runner in runners.values():  # warm-up
        for _ in range(2):
            runner.step()
    sync(args.device)
    rounds = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method, runner in runners.items():
            times = []
            for _ in range(args.steps):
                sync(args.device)
                start = time.perf_counter()
                runner.step()
                sync(args.device)
                times.append(time.perf_counter() - start)
            rounds[method].append(statistics.median(times))
    counts = {m: op_counts(r) for m, r in runners.items()}
    model_counts = {m: op_counts(r, optimizer=False) for m, r in runners.items()}
    layers = 7 * args.layers
    ref = "lora" if "lora" in methods else methods[0]
    ref_time = statistics.median(rounds[ref])
    print(f"{'method':12s} {'step ms':>9s} {'x ' + ref:>8s} {'step ops':>9s} {'/layer over ' + ref:>17s} "
          f"{'fwd+bwd ops':>12s} {'/layer over ' + ref:>17s}")
    for method in methods:
        t = statistics.median(rounds[method])
        total, model = sum(counts[method].values()), sum(model_counts[method].values())
        extra = (total - sum(counts[ref].values())) / layers
        model_extra = (model - sum(model_counts[ref].values())) / layers
        print(f"{method:12s} {t * 1e3:9.2f} {t / ref_time:8.2f} {total:9d} {extra:17.1f} {model:12d} {model_extra:17.1f}")
    if args.top and "adalora" in counts and ref in counts:
        diff = counts["adalora"].copy()
        diff.subtract(counts[ref])
        print(f"ops AdaLoRA adds per adapted layer over {ref}:")
        for name, n in diff.most_common(args.top):
            print(f"  {name:40s} {n / layers:6.2f}")


if __name__ == "__main__":
    main()
