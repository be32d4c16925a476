"""Cost of several named adapters: set_active and a mixed ``rows`` forward vs one adapter's forward.

    python -m benchmarks.named_adapters --size tiny
    OMP_NUM_THREADS=2 python -m benchmarks.named_adapters --size 135m --batch 4 --seq 64

Builds the LLaMA shape from a config with random weights (no download), three LoRA adapters
(r=16) on q/k/v/o/gate/up/down named a, b, c, and times (median of --repeats, eval, no_grad):
the forward with one adapter alone on the model (the single-adapter path), the same with
a, b, c held and "a" active, ``set_active`` between two of them, and a ``rows`` forward mixing
a, b, c and the base over the batch. Then the same for an attention adapter beside a LoRA:
LMAM (``--lmam-n``, r=8, default targets: every attention module) named "lmam" and the LoRA
named "lora": each alone on the model, both held with "lmam" active, ``set_active``
between them, and a ``rows`` forward mixing lora/lmam/base. Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import modapt
from benchmarks.train_step import SIZES

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in SIZES[size].items() if k not in ("batch", "seq")}
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).eval()


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "135m"], default="tiny")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lmam-n", type=int, default=32, help="LMAM's map size n (0: skip the LMAM part)")
    args = parser.parse_args(argv)
    batch = args.batch or SIZES[args.size]["batch"]
    seq = args.seq or SIZES[args.size]["seq"]
    recipe = {"adapter": [{"method": "lora", "targets": TARGETS, "r": args.rank}]}
    ids = torch.randint(0, SIZES[args.size]["vocab_size"], (batch, seq))
    with torch.no_grad():
        single = modapt.apply(_model(args.size), recipe)
        one = _time(lambda: single(input_ids=ids), args.repeats)
        del single
        model = modapt.apply(_model(args.size), recipe, name="a")
        modapt.apply(model, recipe, name="b")
        modapt.apply(model, recipe, name="c")
        modapt.set_active(model, "a")
        held = _time(lambda: model(input_ids=ids), args.repeats)
        names = iter(["b", "a"] * (args.repeats + 1))
        switch = _time(lambda: modapt.set_active(model, next(names)), args.repeats)
        mix = (["a", "b", "c", None] * batch)[:batch]

        def mixed():
            with modapt.rows(model, mix):
                model(input_ids=ids)

        rows = _time(mixed, args.repeats)
    adapter = sum(p.numel() for p in modapt.trainable_parameters(model).values())
    print(f"size={args.size} batch={batch} seq={seq} rank={args.rank} adapter params={adapter}")
    print(f"forward, one adapter on the model:          {one:9.2f} ms")
    print(f"forward, a/b/c held, 'a' active:             {held:9.2f} ms")
    print(f"set_active (a <-> b):                        {switch:9.2f} ms")
    print(f"rows forward ({'/'.join(str(n) for n in mix[:4])}...):  {rows:9.2f} ms")
    if args.lmam_n:
        _lmam_beside_lora(args, recipe, ids, batch)
    return 0


def _lmam_beside_lora(args, lora: dict, ids: torch.Tensor, batch: int) -> None:
    lmam = {"adapter": [{"method": "lmam", "n": args.lmam_n, "r": 8}]}
    with torch.no_grad():
        alone = {}
        for name, recipe in (("lora", lora), ("lmam", lmam)):
            single = modapt.apply(_model(args.size), recipe)
            alone[name] = _time(lambda single=single: single(input_ids=ids), args.repeats)
            del single
        model = modapt.apply(_model(args.size), lora, name="lora")
        modapt.apply(model, lmam, name="lmam")
        modapt.set_active(model, "lmam")
        held = _time(lambda: model(input_ids=ids), args.repeats)
        names = iter(["lora", "lmam"] * (args.repeats + 1))
        switch = _time(lambda: modapt.set_active(model, next(names)), args.repeats)
        mix = (["lora", "lmam", None] * batch)[:batch]

        def mixed():
            with modapt.rows(model, mix):
                model(input_ids=ids)

        rows = _time(mixed, args.repeats)
    print(f"LMAM n={args.lmam_n} r=8 beside the LoRA:")
    print(f"forward, LoRA alone on the model:            {alone['lora']:9.2f} ms")
    print(f"forward, LMAM alone on the model:            {alone['lmam']:9.2f} ms")
    print(f"forward, lora/lmam held, 'lmam' active:      {held:9.2f} ms")
    print(f"set_active (lora <-> lmam):                  {switch:9.2f} ms")
    print(f"rows forward ({'/'.join(str(n) for n in mix[:3])}...):    {rows:9.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
