"""AdaLoRA's per-layer dispatch cost: step time and op counts in the launch-bound regime.

Methods, each on its own copy of the same model, timed in interleaved rounds: modapt LoRA
(r = init_r), modapt AdaLoRA, PEFT LoRA, PEFT AdaLoRA (and full fine-tuning as the floor). A
step is forward + loss (+ AdaLoRA's orthogonality regulariser), backward, AdamW, the allocation
hook (``modapt.after_optimizer_step`` / PEFT's ``update_and_allocate``), zero_grad; the schedule
is the shrinking phase with deltaT = 1 (every step scores and reallocates, the costliest), or
``--deltaT N`` / ``--tinit N`` to time the cheaper steps. Then aten ops per step and the extra
ops per adapted layer over modapt LoRA (:mod:`modapt.testing.dispatch` says why a tiny-hidden
LLaMA on a CPU measures the GPU's launch-bound regime).

CPU proxy:  python plugins/adalora/benchmarks/dispatch.py                    (hidden 64, 30 layers, 4 x 16 tokens, fp32)
GPU (135M): python plugins/adalora/benchmarks/dispatch.py --hidden 576 --intermediate 1536 --heads 9 --kv-heads 3 \\
                --vocab 49152 --batch 32 --seq 64 --precision autocast
"""

from __future__ import annotations

from modapt.testing import dispatch

METHODS = ["full-ft", "lora", "adalora", "peft-lora", "peft-adalora"]


def schedule(args) -> dict:
    return {"init_r": args.r, "target_r": max(1, args.r // 2), "lora_alpha": float(2 * args.r), "tinit": args.tinit,
            "tfinal": 0, "deltaT": args.deltaT, "total_step": 100_000}


def adapt(method, model, args):
    """(model, extra loss, after-step hook) for one method."""
    if method == "full-ft":
        return model, None, None
    if method.startswith("peft-"):
        import peft

        if method == "peft-lora":
            config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=dispatch.TARGETS)
            return peft.get_peft_model(model, config), None, None
        config = peft.AdaLoraConfig(target_modules=dispatch.TARGETS, **schedule(args))
        model = peft.get_peft_model(model, config)
        return model, None, model.base_model.update_and_allocate
    import modapt

    if method == "lora":
        entry = {"method": "lora", "r": args.r, "lora_alpha": 2.0 * args.r, "targets": dispatch.TARGETS}
        return modapt.apply(model, {"adapter": [entry]}), None, None
    model = modapt.apply(model, {"adapter": [{"method": "adalora", "targets": dispatch.TARGETS, **schedule(args)}]})
    return model, (lambda: modapt.regularization_loss(model)), (lambda step: modapt.after_optimizer_step(model, step))


def arguments(p):
    p.add_argument("--tinit", type=int, default=0, help="AdaLoRA warm-up steps (no pruning before)")
    p.add_argument("--deltaT", type=int, default=1, help="AdaLoRA steps between reallocations")


def main(argv=None):
    dispatch.main(__doc__.split("\n")[0], METHODS, adapt, focus="adalora",
                  settings=lambda args: f"init_r {args.r}, tinit {args.tinit}, deltaT {args.deltaT}",
                  extra_arguments=arguments, argv=argv)


if __name__ == "__main__":
    main()
