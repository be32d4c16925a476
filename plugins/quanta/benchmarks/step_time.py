"""Training-step time and peak memory of QuanTA against LoRA on a LLaMA-shaped model.

Random weights from a config (no download). CPU: float32; CUDA: bfloat16 base (adapters in
float32, as modapt does by default). Prints one table row per recipe.

    python plugins/quanta/benchmarks/step_time.py                      # CPU smoke (tiny)
    python plugins/quanta/benchmarks/step_time.py --hidden 4096 --intermediate 11008 \
        --layers 4 --seq 1024 --batch 4 --dims 16 8 8 4                # GPU figures
"""

from __future__ import annotations

import modapt
import modapt.lora
from modapt.testing import step_timing
import modapt_quanta.plugin


def recipes(args):
    targets = ["q_proj", "v_proj"]
    quanta = {"method": "quanta", "targets": targets}
    if args.dims:
        quanta["dims"] = args.dims
    return {
        "lora r=8": {"adapter": [{"method": "lora", "r": 8, "targets": targets}]},
        f"quanta {'-'.join(map(str, args.dims)) if args.dims else 'auto'}": {"adapter": [quanta]},
    }


def main():
    p = step_timing.parser(__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="*", default=None)
    args = p.parse_args()
    registry = modapt.Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    registry.register_plugin(modapt_quanta.plugin, name="quanta", distribution="modapt-quanta")
    step_timing.run(args, registry, recipes(args))


if __name__ == "__main__":
    main()
