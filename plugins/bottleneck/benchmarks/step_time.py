"""Training-step time and peak memory of bottleneck adapters (3 placements) against LoRA.

Random weights from a config (no download). CPU: float32; CUDA: bfloat16 base (adapters in
float32, as modapt does by default). Prints one table row per recipe.

    python plugins/bottleneck/benchmarks/step_time.py                  # CPU smoke (tiny)
    python plugins/bottleneck/benchmarks/step_time.py --hidden 4096 --intermediate 11008 \
        --layers 4 --seq 1024 --batch 4 --rank 16                       # GPU figures
"""

from __future__ import annotations

import modapt
import modapt.lora
from modapt.testing import step_timing
import modapt_bottleneck.plugin


def recipes(args):
    out = {f"lora r={args.rank}": {"adapter": [{"method": "lora", "r": args.rank, "targets": ["q_proj", "v_proj"]}]}}
    for placement in ("series", "parallel", "ffn"):
        out[f"bottleneck {placement} r={args.rank}"] = {"adapter": [
            {"method": "bottleneck", "placement": placement, "r": args.rank}]}
    return out


def main():
    p = step_timing.parser(__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    registry = modapt.Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    registry.register_plugin(modapt_bottleneck.plugin, name="bottleneck", distribution="modapt-bottleneck")
    step_timing.run(args, registry, recipes(args))


if __name__ == "__main__":
    main()
