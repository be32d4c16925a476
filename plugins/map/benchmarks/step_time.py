"""LoRA vs LoMAP vs AdaLoMAP, MAP's one-node path vs its general path: step time, peak and saved memory.

One step = forward (+ AdaLoRA's regulariser) + backward + ``modapt.before_optimizer_step`` + AdamW
step + ``modapt.after_optimizer_step`` + zero_grad, on a randomly initialised LLaMA built from a
config (no download), causal-LM loss on random ids; adapters on q, k, v, o, gate, up, down with
rank r (lora_alpha = 2r; AdaLoRA: init_r = r, target_r = r/2). ``<method>-general`` is the same
recipe with MAP's one-node path switched off (``modapt.fast_paths(map_one_node=False)``): every layer
takes the update's forward and ``MapOutput``, as before the one-node path existed.

Figures per method:

* step time: median and best over ``--steps`` timed steps after ``--warmup``; all models live side
  by side and their timed steps alternate, so that a busy machine's drift hits them alike;
* peak step memory: the most memory allocated during one step above what was allocated before it
  (``modapt.testing.memory.peak_bytes``: CUDA ``max_memory_allocated``; CPU the profiler's events);
* saved for backward: the bytes autograd keeps between forward and backward (every tensor passed
  to ``torch.autograd.graph.saved_tensors_hooks``' pack hook, each storage counted once, parameters
  and buffers left out: they live anyway), and the difference to LoRA per adapted layer.

CPU::

    python plugins/map/benchmarks/step_time.py --size small
CUDA (the issue-25 shapes; bf16 base with float32 adapters, and bf16 autocast at 135M)::

    python plugins/map/benchmarks/step_time.py --size 1.1b --batch 8 --seq 1024 --steps 10
    python plugins/map/benchmarks/step_time.py --size 135m --batch 32 --seq 64 --precision autocast --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import modapt
import torch
from modapt.testing.memory import peak_bytes, saved_bytes

SIZES = {  # LlamaConfig fields
    "tiny": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 128},
    "small": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 4, "vocab_size": 8192},
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "vocab_size": 49152},  # SmolLM2-135M's shapes
    "1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000},  # benchmarks/train_step.py's "1b"
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256},  # Llama-3.2-1B's shapes
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["peft-lora", "lora", "lomap", "lomap-general", "adalomap", "adalomap-general", "floramap",
           "floramap-general"]


def recipe(method: str, r: int, total_steps: int) -> dict:
    lora = {"method": "lora", "r": r, "lora_alpha": float(2 * r)}
    adalora = {"method": "adalora", "init_r": r, "target_r": max(1, r // 2), "lora_alpha": float(2 * r),
               "total_step": total_steps, "tinit": 0, "tfinal": 0, "deltaT": 1}
    name = method.removesuffix("-general")
    if name == "lora":
        return {"adapter": [{**lora, "targets": TARGETS}]}
    flora = {"method": "flora", "r": r, "lora_alpha": float(2 * r)}
    update = {"lomap": lora, "adalomap": adalora, "floramap": flora}[name]
    return {"adapter": [{"method": "map", "targets": TARGETS, "update": update}]}


def build(size: str, device: torch.device, precision: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    return model.to(torch.bfloat16) if precision == "bf16" else model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One adapted model with its optimizer and a fixed batch; ``step()`` is one training step."""

    def __init__(self, method: str, args, device: torch.device):
        self.fused = not method.endswith("-general")
        self.device = device
        total = args.warmup + args.steps + 2
        self.model = build(args.size, device, args.precision)
        if method == "peft-lora":
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(self.model, LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                               target_modules=TARGETS))
            self.hooks = False
        else:
            modapt.apply(self.model, recipe(method, args.r, total))
            self.hooks = True
        self.regularised = "adalo" in method
        self.adapted = sum(1 for m in self.model.modules() if isinstance(m, modapt.AdaptedLayer)) or 7 * \
            self.model.config.num_hidden_layers
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, self.model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
        self.autocast = args.precision == "autocast"
        self.count = 0
        self.times: list[float] = []

    def loss(self) -> torch.Tensor:
        with modapt.fast_paths(map_one_node=self.fused), \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            if self.regularised:
                loss = loss + modapt.regularization_loss(self.model)
        return loss

    def step(self) -> None:
        self.loss().backward()
        if self.hooks:
            modapt.before_optimizer_step(self.model, self.count)
        self.opt.step()
        if self.hooks:
            modapt.after_optimizer_step(self.model, self.count)
        self.opt.zero_grad(set_to_none=True)
        self.count += 1

    def saved_bytes(self) -> int:
        """Bytes autograd keeps for the backward of one forward: each storage once, without the
        model's parameters and buffers (resident anyway)."""
        losses = []
        saved = saved_bytes(lambda: losses.append(self.loss()), [*self.model.parameters(), *self.model.buffers()])
        losses.pop().backward()
        self.opt.zero_grad(set_to_none=True)
        return saved


def measure(methods: list[str], args, device: torch.device) -> dict[str, dict]:
    runs = {}
    for method in methods:
        try:
            runs[method] = Run(method, args, device)
        except (ImportError, KeyError) as err:  # peft or the adalora plugin not installed
            print(f"skipped {method}: {err!r}")
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    sync(device)
    for _ in range(args.steps):
        for run in runs.values():
            sync(device)
            t0 = time.perf_counter()
            run.step()
            sync(device)
            run.times.append(time.perf_counter() - t0)
    results = {}
    for method, run in runs.items():
        results[method] = {"time": statistics.median(run.times), "best": min(run.times),
                           "peak": peak_bytes(run.step, device), "saved": run.saved_bytes(),
                           "adapted": run.adapted, "params": sum(p.numel() for p in run.params)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "autocast", "fp32"], default=None,
                        help="bf16: bf16 base, fp32 adapters, no autocast (default on CUDA); autocast: fp32 "
                             "weights under bf16 autocast; fp32 (default on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"LLaMA '{args.size}' {SIZES[args.size]}, batch {args.batch}, seq {args.seq}, r {args.r}, "
          f"precision {args.precision} on {device_name}, torch {torch.__version__}")
    results = measure(methods, args, device)
    base = results.get("peft-lora") or results.get("lora")
    base_name = "peft-lora" if "peft-lora" in results else "lora"
    lora = results.get("lora")
    print(f"\n| method | trainable | step ms (median) | best | × {base_name} | peak step MiB | × {base_name} "
          f"| saved for backward MiB | − lora per adapted layer, KiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, r in results.items():
        extra = "" if lora is None else f"{(r['saved'] - lora['saved']) / r['adapted'] / 2**10:+.1f}"
        print(f"| {method} | {r['params']:,} | {r['time'] * 1e3:.1f} | {r['best'] * 1e3:.1f} | "
              f"{r['time'] / base['time']:.3f} | {r['peak'] / 2**20:.1f} | {r['peak'] / base['peak']:.3f} | "
              f"{r['saved'] / 2**20:.1f} | {extra} |")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
