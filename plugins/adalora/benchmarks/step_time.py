"""AdaLoRA vs LoRA training step: time and memory, modapt and PEFT 0.21 side by side, in one run.

A LLaMA-shaped causal LM built from a config (random weights, no download; bf16 on CUDA,
fp32 on CPU), adapters on the seven linear kinds (q, k, v, o, gate, up, down), AdamW. Four
runs, each on a fresh model with the same weights: modapt LoRA (r = init_r), modapt AdaLoRA,
PEFT LoRA, PEFT AdaLoRA. LoRA gets r = init_r so both have the same adapter shapes and the
ratio is the price of AdaLoRA's machinery: Λ in the forward, the orthogonality regulariser,
and after every optimizer step the importance scores and a reallocation (deltaT = 1 and a
schedule long enough that every timed step is in the shrinking phase, the costliest one).

One step is: forward + loss (+ regulariser), backward, optimizer step, the allocation
(``modapt.after_optimizer_step`` / PEFT's ``update_and_allocate``), zero_grad. Printed: the
median step time, CUDA peak allocated memory during the timed steps (``max_memory_allocated``),
and everywhere the bytes of the allocator's score tensors; then the AdaLoRA/LoRA ratios.

CPU smoke:   python plugins/adalora/benchmarks/step_time.py --size tiny
GPU (H100):  python plugins/adalora/benchmarks/step_time.py --size 1b --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch
from modapt.testing.step_timing import time_steps

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 1024},
    "160m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "num_key_value_heads": 12, "vocab_size": 32000},
    # TinyLlama-1.1B's shape
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
               "num_key_value_heads": 4, "vocab_size": 32000},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SIZES[args.size])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    config = LlamaConfig(**cfg, max_position_embeddings=max(2048, args.seq), attn_implementation="sdpa",
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def schedule(args) -> dict:
    # every timed step falls in the shrinking phase: total_step far beyond the steps run
    return {"init_r": args.init_r, "target_r": args.target_r, "lora_alpha": float(args.alpha), "tinit": 0, "tfinal": 0,
                "deltaT": 1, "total_step": 100 * (args.warmup + args.steps + 1)}


def adapt(model, library, method, args):
    """The adapted model, its trainable parameters, and ``after_step(step)`` (the allocation or nothing)."""
    if library == "modapt":
        import modapt

        if method == "lora":
            entry = {"method": "lora", "r": args.init_r, "lora_alpha": float(args.alpha), "targets": TARGETS}
        else:
            entry = {"method": "adalora", "targets": TARGETS, **schedule(args)}
        modapt.apply(model, {"adapter": [entry]})
        loss_extra = lambda: modapt.regularization_loss(model)
        after_step = lambda step: modapt.after_optimizer_step(model, step)
        return model, list(modapt.trainable_parameters(model).values()), loss_extra, after_step
    import peft

    if method == "lora":
        config = peft.LoraConfig(r=args.init_r, lora_alpha=args.alpha, target_modules=TARGETS, task_type="CAUSAL_LM")
    else:
        config = peft.AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **schedule(args))
    model = peft.get_peft_model(model, config)
    # PEFT adds the orthogonality term inside forward (task_type CAUSAL_LM routes through AdaLoraModel.forward)
    after_step = (lambda step: model.base_model.update_and_allocate(step)) if method == "adalora" else None
    return model, [p for p in model.parameters() if p.requires_grad], None, after_step


def score_bytes(model, library) -> int:
    """Bytes of the allocator's exponential averages (sensitivity and uncertainty)."""
    if library == "modapt":
        from modapt_adalora import allocators_of

        return sum(t.numel() * t.element_size() for a in allocators_of(model)
                   for t in a.sensitivity + a.uncertainty)
    alloc = getattr(model.base_model, "rankallocator", None)
    if alloc is None:
        return 0
    tensors = list(alloc.exp_avg_ipt.values()) + list(alloc.exp_avg_unc.values()) + list(alloc.ipt.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def run(library, method, args, device, dtype):
    model = build_model(args, device, dtype)
    model, params, loss_extra, after_step = adapt(model, library, method, args)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    counter = {"step": 0}

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        if loss_extra is not None:
            loss = loss + loss_extra()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(counter["step"])
        optimizer.zero_grad(set_to_none=True)
        counter["step"] += 1

    times, peak = time_steps(step, device, args.warmup, args.steps)
    return {"time": statistics.median(times), "peak": peak, "scores": score_bytes(model, library)}


def release(device):
    """Free the previous run's model before the next one is built (peak memory is per run)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--layers", type=int, default=0, help="override the number of decoder layers")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--init-r", type=int, default=12, help="AdaLoRA's init_r; LoRA's r")
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=32, help="lora_alpha (both methods)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="base model dtype; auto = bfloat16 on CUDA, float32 on CPU (adapters stay float32)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    import peft
    import transformers

    print(f"size={args.size} batch={args.batch} seq={args.seq} init_r={args.init_r} target_r={args.target_r} "
          f"device={device} dtype={dtype} torch={torch.__version__} transformers={transformers.__version__} "
          f"peft={peft.__version__}")
    results = {}
    for library in ("modapt", "peft"):
        for method in ("lora", "adalora"):
            r = run(library, method, args, device, dtype)
            release(device)
            results[library, method] = r
            peak = f"{r['peak'] / 2**20:9.1f} MiB" if r["peak"] is not None else "      n/a"
            print(f"{library:7s} {method:8s} step {r['time'] * 1e3:9.2f} ms  peak {peak}  "
                  f"scores {r['scores'] / 2**20:7.2f} MiB", flush=True)
    for library in ("modapt", "peft"):
        lo, ada = results[library, "lora"], results[library, "adalora"]
        mem = f"{ada['peak'] / lo['peak']:.3f}x" if lo["peak"] else "n/a (CPU)"
        print(f"{library:7s} AdaLoRA/LoRA: time {ada['time'] / lo['time']:.3f}x  peak memory {mem}")
    ours, theirs = results["modapt", "adalora"], results["peft", "adalora"]
    print(f"AdaLoRA modapt/PEFT: time {ours['time'] / theirs['time']:.3f}x"
          + (f"  peak memory {ours['peak'] / theirs['peak']:.3f}x" if theirs["peak"] else ""))


if __name__ == "__main__":
    main()
