"""``modapt merge --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR``: a plain checkpoint."""

from __future__ import annotations

import sys


def configure(parser):
    parser.description = ("Fold an adapter (a modapt adapter folder or a PEFT one) into a safetensors checkpoint, "
                          "shard by shard, and write a checkpoint that plain transformers loads.")
    parser.add_argument("--base", required=True, metavar="MODEL_DIR",
                        help="transformers checkpoint folder (config.json + model.safetensors or shards)")
    parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="modapt or PEFT adapter folder")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--unsafe", action="store_true", help="do not stop on NaN/Inf in a merged tensor")
    parser.add_argument("--no-verify-base", action="store_true",
                        help="skip the base fingerprint check (a base in another dtype than the adapter was trained on)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the merged weights of a base saved quantized (default: its compute dtype)")
    parser.add_argument("--quiet", action="store_true", help="no stage reports on stderr")
    parser.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from modapt.errors import ModaptError

    for option, value in (("--base", args.base), ("--adapter", args.adapter)):
        if not Path(value).is_dir():
            raise ModaptError(f"{option} {value}: not a folder")
    from .merge import merge_checkpoint
    from .progress import Progress

    out = merge_checkpoint(args.base, args.adapter, args.out, safe=not args.unsafe, overwrite=args.overwrite,
                           verify_base=not args.no_verify_base,
                           dtype=getattr(torch, args.dtype) if args.dtype else None, progress=Progress(quiet=args.quiet))
    print(f"merged {args.adapter} into {args.base}: {out}", file=sys.stderr)
    return 0
