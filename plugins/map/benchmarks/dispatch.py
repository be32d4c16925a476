"""LoMAP's and AdaLoMAP's per-layer dispatch cost, one-node path vs general path, in the launch-bound regime.

Methods, each on its own copy of the same model, timed in interleaved rounds: modapt LoRA (the
reference), LoMAP, AdaLoMAP, each also as ``<method>-general`` (MAP's one-node path switched off:
``modapt.fast_paths(map_one_node=False)`` while that model runs), and PEFT LoRA. Then aten ops per
step and the extra ops per adapted layer over modapt LoRA (:mod:`modapt.testing.dispatch` says
why a tiny-hidden LLaMA on a CPU measures the GPU's launch-bound regime, the 135M shape's).

CPU proxy:  python plugins/map/benchmarks/dispatch.py                       (hidden 64, 30 layers, 4 x 16 tokens, fp32)
GPU (135M): python plugins/map/benchmarks/dispatch.py --hidden 576 --intermediate 1536 --heads 9 --kv-heads 3 \\
                --vocab 49152 --batch 32 --seq 64 --precision autocast
"""

from __future__ import annotations

from modapt.testing import dispatch

METHODS = ["lora", "lomap", "lomap-general", "adalomap", "adalomap-general", "peft-lora"]


def adapt(method, model, args):
    """(model, extra loss, after-step hook) for one method."""
    if method == "peft-lora":
        import peft

        config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=dispatch.TARGETS)
        return peft.get_peft_model(model, config), None, None
    import modapt

    lora = {"method": "lora", "r": args.r, "lora_alpha": 2.0 * args.r}
    if method == "lora":
        return modapt.apply(model, {"adapter": [{**lora, "targets": dispatch.TARGETS}]}), None, None
    name = method.removesuffix("-general")
    update = lora if name == "lomap" else {"method": "adalora", "init_r": args.r, "target_r": max(1, args.r // 2),
                                           "lora_alpha": 2.0 * args.r, "tinit": 0, "tfinal": 0, "deltaT": 1,
                                           "total_step": 100_000}
    modapt.apply(model, {"adapter": [{"method": "map", "targets": dispatch.TARGETS, "update": update}]})
    fused = name == method

    def switch(module, inputs):  # MAP's one-node path on or off while this model's forward runs
        module.modapt_fast_paths = modapt.fast_paths(map_one_node=fused)
        module.modapt_fast_paths.__enter__()

    def switch_back(module, inputs, output):
        module.modapt_fast_paths.__exit__(None, None, None)

    model.register_forward_pre_hook(switch)
    model.register_forward_hook(switch_back)
    if name == "lomap":
        return model, None, None
    return model, (lambda: modapt.regularization_loss(model)), (lambda step: modapt.after_optimizer_step(model, step))


def main(argv=None):
    dispatch.main(__doc__.split("\n")[0], METHODS, adapt, focus="lomap", settings=lambda args: f"r {args.r}", argv=argv)


if __name__ == "__main__":
    main()
