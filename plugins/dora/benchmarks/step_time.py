"""DoRA vs LoRA training step: time and memory, modapt and PEFT 0.21 side by side, in one run.

A LLaMA-shaped causal LM built from a config (random weights, no download), adapters on all
seven linear kinds (q, k, v, o, gate, up, down), r = 16, lora_alpha = 32, AdamW. Four runs,
each on a fresh copy of the same model: modapt LoRA, modapt DoRA, PEFT LoRA, PEFT DoRA. Each
prints the median step time (forward + backward + optimizer step) and the memory:

* CUDA: peak allocated memory of the step (``torch.cuda.max_memory_allocated``), and
* everywhere: the bytes of the activations kept for the backward (unique storages packed by
  autograd, parameters excluded), a device-independent view of the same cost.

Then the DoRA/LoRA ratios for modapt and for PEFT, and, for modapt's DoRA after training, the
largest relative error of the factored row norm against the direct one (float64 reference).

CPU smoke:   python plugins/dora/benchmarks/step_time.py --size tiny
GPU (H100):  python plugins/dora/benchmarks/step_time.py --size 1b --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch
from modapt.testing.memory import saved_bytes
from modapt.testing.step_timing import time_steps

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    # TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SIZES[args.size])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if args.vocab:
        cfg["vocab_size"] = args.vocab
    config = LlamaConfig(**cfg, max_position_embeddings=max(2048, args.seq), attn_implementation="sdpa",
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def adapt(model, library, method, args):
    if library == "modapt":
        import modapt

        lora = {"method": "lora", "r": args.r, "lora_alpha": 2.0 * args.r, "dropout": args.dropout}
        entry = {**lora, "targets": TARGETS} if method == "lora" else {"method": "dora", "targets": TARGETS, "update": lora}
        modapt.apply(model, {"adapter": [entry]})
        return model, list(modapt.trainable_parameters(model).values())
    import peft

    config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=TARGETS,
                             use_dora=(method == "dora"))
    model = peft.get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def run(library, method, args, device, dtype):
    model = build_model(args, device, dtype)
    model, params = adapt(model, library, method, args)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)

    def forward():
        return model(input_ids=ids, labels=ids).loss

    def step(loss=None):
        loss = forward() if loss is None else loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times, peak = time_steps(step, device, args.warmup, args.steps)
    losses = []  # one more step, its forward's saved tensors counted
    saved = saved_bytes(lambda: losses.append(forward()), model.parameters())
    step(losses.pop())
    result = {"time": statistics.median(times) if times else float("nan"), "peak": peak, "saved": saved}
    if library == "modapt" and method == "dora":
        result["norm_error"] = norm_error(model)
    del model, params, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


@torch.no_grad()
def norm_error(model) -> float:
    """max over layers and rows of |factored − direct| / direct, direct in float64."""
    import modapt
    from modapt import layers

    worst = 0.0
    for host in modapt.state_of(model).layers.values():
        w0 = layers.weight_of(host.base_layer).double()
        left, right = host.update.factors()
        direct = (w0 + left.double() @ right.double()).norm(dim=1)
        fast = host.reparam.row_norm().double()
        worst = max(worst, ((fast - direct).abs() / direct).max().item())
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--layers", type=int, default=0, help="override the number of decoder layers")
    parser.add_argument("--vocab", type=int, default=0, help="override the vocabulary size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="LoRA dropout (> 0 makes both DoRAs recompute W0 on the dropped input)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--only", choices=["modapt", "peft"], help="run one library only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    import peft
    import transformers
    from modapt_dora.norm import split_product_available

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}")
    print(f"model {args.size} (layers {args.layers or SIZES[args.size]['num_hidden_layers']}), batch {args.batch}, "
          f"seq {args.seq}, r {args.r}, dropout {args.dropout}, targets {','.join(TARGETS)}, "
          f"{args.steps} timed steps after {args.warmup}")
    libraries = [args.only] if args.only else ["modapt", "peft"]
    results = {}
    for library in libraries:
        for method in ("lora", "dora"):
            res = results[library, method] = run(library, method, args, device, dtype)
            peak = f", peak {res['peak'] / 2**30:.2f} GiB" if res["peak"] is not None else ""
            print(f"{library:7s}{method:5s} step {res['time'] * 1e3:9.1f} ms{peak}, "
                  f"saved activations {res['saved'] / 2**30:.3f} GiB", flush=True)
    print("DoRA / LoRA ratios:")
    for library in libraries:
        lora, dora = results[library, "lora"], results[library, "dora"]
        line = f"  {library:7s} time {dora['time'] / lora['time']:.3f}x"
        if lora["peak"]:
            line += f", peak memory {dora['peak'] / lora['peak']:.3f}x"
        line += f", saved activations {dora['saved'] / lora['saved']:.3f}x"
        print(line)
    if "modapt" in libraries:
        print(f"modapt DoRA factored row norm: max relative error vs direct (float64) "
              f"{results['modapt', 'dora']['norm_error']:.2e}; half-precision split product used: "
              f"{split_product_available(device.type)}")


if __name__ == "__main__":
    main()
