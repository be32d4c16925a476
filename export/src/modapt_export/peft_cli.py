"""``modapt export peft``: write a modapt adapter folder as a PEFT adapter folder."""

from __future__ import annotations

import argparse


def configure_peft(sub) -> None:
    """Add the ``peft`` format to ``modapt export``'s sub-commands (``sub``: argparse subparsers)."""
    peft = sub.add_parser(
        "peft", help="convert a modapt adapter folder into a PEFT adapter folder",
        description="Read ADAPTER_DIR (modapt.save, any format version) and write OUT_DIR with PEFT's "
                    "adapter_config.json and adapter_model.safetensors, which PeftModel.from_pretrained and "
                    "transformers' load_adapter read. The base's config.json is read (never its weights) to learn "
                    "the layers' kinds. Adapters PEFT cannot express (MAP, LoRMA, QuanTA, ...) are refused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    peft.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="modapt adapter folder")
    peft.add_argument("--out", required=True, metavar="OUT_DIR", help="PEFT adapter folder to create")
    peft.add_argument("--base", default=None, metavar="MODEL_DIR",
                      help="base model folder (default: the one the adapter recorded)")
    peft.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    peft.set_defaults(run=run_peft)


def run_peft(args) -> int:
    """Run the conversion; errors are ModaptErrors, printed as one line by the CLI."""
    from .peft_format import convert_to_peft

    out = convert_to_peft(args.adapter, args.out, base_dir=args.base, overwrite=args.overwrite)
    print(f"wrote {out} (PEFT adapter folder)")
    return 0
