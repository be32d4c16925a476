"""Peak memory of the streaming merge: RSS increase over the RSS just before the merge.

    python export/benchmarks/merge_memory.py --workdir /tmp/mm [--hidden 512 --layers 4 --shard 10MB]

Builds a random LLaMA checkpoint sharded at ``--shard`` and a LoRA adapter in a first process,
then merges it in a fresh process that first runs one warm-up merge (so that lazy imports do not
count), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and measures VmHWM.
Prints one JSON line. The merge runs on the CPU whatever the machine (it never needs a GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make(workdir: Path, hidden: int, layers: int, shard: str, vocab: int) -> None:
    import modapt
    from modapt.testing import tiny_llama
    from modapt.testing.conformance import perturb

    overrides = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab)
    tiny_llama(**overrides).save_pretrained(workdir / "base", max_shard_size=shard)
    model = modapt.apply(tiny_llama(**overrides),
                         {"adapter": [{"method": "lora", "r": 8, "targets": ["q_proj", "v_proj", "down_proj"]}]})
    perturb(model)
    modapt.save(model, workdir / "adapter")


def measure(workdir: Path) -> dict:
    from modapt_export import merge_checkpoint

    merge_checkpoint(workdir / "base", workdir / "adapter", workdir / "warmup")
    shutil.rmtree(workdir / "warmup")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    merge_checkpoint(workdir / "base", workdir / "adapter", workdir / "merged")
    peak = _status("VmHWM")
    shards = sorted((workdir / "base").glob("*.safetensors"))
    sizes = [p.stat().st_size for p in shards]
    adapter = (workdir / "adapter" / "adapter_model.safetensors").stat().st_size
    return {"checkpoint_bytes": sum(sizes), "shards": len(sizes), "largest_shard_bytes": max(sizes),
            "adapter_bytes": adapter, "rss_before_bytes": before, "peak_increase_bytes": peak - before,
            "bound_bytes": int(1.5 * max(sizes) + adapter)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--shard", default="10MB")
    parser.add_argument("--measure-only", action="store_true", help="(internal) the measuring process")
    args = parser.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.workdir)))
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    make(args.workdir, args.hidden, args.layers, args.shard, args.vocab)
    gc.collect()
    # a fresh interpreter: memory freed by building the model must not hide the merge's own
    proc = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--measure-only"],
                          capture_output=True, text=True, check=True)
    print(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
