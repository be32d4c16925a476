"""Training-step time and peak memory of FLoRA (and FLoMAP when modapt-map is installed) against LoRA.

Random weights from a config (no download). CPU: float32; CUDA: bfloat16 base (adapters in
float32, as modapt does by default). Prints one table row per recipe.

    python plugins/flora/benchmarks/step_time.py                       # CPU smoke (tiny)
    python plugins/flora/benchmarks/step_time.py --hidden 4096 --intermediate 11008 \
        --layers 4 --seq 1024 --batch 4 --rank 8                        # GPU figures
"""

from __future__ import annotations

import modapt
import modapt.lora
from modapt.testing import step_timing
import modapt_flora.plugin


def recipes(args, registry):
    targets = ["q_proj", "v_proj"]
    out = {
        f"lora r={args.rank}": {"adapter": [{"method": "lora", "r": args.rank, "targets": targets}]},
        f"flora r={args.rank}": {"adapter": [{"method": "flora", "r": args.rank, "targets": targets}]},
    }
    try:
        import modapt_map.plugin
    except ImportError:
        return out
    registry.register_plugin(modapt_map.plugin, name="map", distribution="modapt-map")
    for update in ("lora", "flora"):
        out[f"map({update}) r={args.rank}"] = {"adapter": [
            {"method": "map", "targets": targets, "update": {"method": update, "r": args.rank}}]}
    return out


def main():
    p = step_timing.parser(__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    registry = modapt.Registry(autoload=False)
    registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    registry.register_plugin(modapt_flora.plugin, name="flora", distribution="modapt-flora")
    step_timing.run(args, registry, recipes(args, registry))


if __name__ == "__main__":
    main()
