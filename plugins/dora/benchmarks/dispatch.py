"""DoRA's per-layer dispatch cost: step time and op counts in the launch-bound regime.

Methods, each on its own copy of the same model, timed in interleaved rounds: modapt LoRA,
modapt DoRA, PEFT LoRA, PEFT DoRA (and full fine-tuning as the floor); then aten ops per step
and the extra ops per adapted layer over modapt LoRA (:mod:`modapt.testing.dispatch` says why
a tiny-hidden LLaMA on a CPU measures the GPU's launch-bound regime).

CPU proxy:  python plugins/dora/benchmarks/dispatch.py                    (hidden 64, 30 layers, 4 x 16 tokens, fp32)
GPU (135M): python plugins/dora/benchmarks/dispatch.py --hidden 576 --intermediate 1536 --heads 9 --kv-heads 3 \\
                --vocab 49152 --batch 32 --seq 64 --precision autocast
"""

from __future__ import annotations

from modapt.testing import dispatch

METHODS = ["full-ft", "lora", "dora", "peft-lora", "peft-dora"]


def adapt(method, model, args):
    """(model, extra loss, after-step hook) for one method."""
    if method == "full-ft":
        return model, None, None
    if method.startswith("peft-"):
        import peft

        config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                 target_modules=dispatch.TARGETS, use_dora=method == "peft-dora")
        return peft.get_peft_model(model, config), None, None
    import modapt

    lora = {"method": "lora", "r": args.r, "lora_alpha": 2.0 * args.r, "dropout": args.dropout}
    entry = ({**lora, "targets": dispatch.TARGETS} if method == "lora"
             else {"method": "dora", "targets": dispatch.TARGETS, "update": lora})
    return modapt.apply(model, {"adapter": [entry]}), None, None


def main(argv=None):
    dispatch.main(__doc__.split("\n")[0], METHODS, adapt, focus="dora",
                  settings=lambda args: f"r {args.r}, dropout {args.dropout}",
                  extra_arguments=lambda p: p.add_argument("--dropout", type=float, default=0.0), argv=argv)


if __name__ == "__main__":
    main()
