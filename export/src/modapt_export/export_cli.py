"""``modapt export onnx``: export a transformers checkpoint (plus a modapt adapter) to a verified ONNX graph."""

from __future__ import annotations

import argparse

from .onnx_io import TASKS

DTYPES = ("auto", "float32", "float16", "bfloat16")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    sub.required = True
    onnx = sub.add_parser(
        "onnx", help="export to model.onnx for ONNX Runtime and verify it against PyTorch",
        description="Load --base (and --adapter), fold weight adapters into the weights, export with "
                    "torch.onnx.export(dynamo=True), verify ONNX Runtime against PyTorch and write OUT_DIR "
                    "(model.onnx, config, tokenizer, modapt_export.json). A failed verification leaves no OUT_DIR.")
    onnx.add_argument("--base", required=True, metavar="MODEL_DIR", help="transformers checkpoint directory")
    onnx.add_argument("--adapter", metavar="ADAPTER_DIR", help="modapt adapter directory (modapt.save)")
    onnx.add_argument("--out", required=True, metavar="OUT_DIR", help="export directory to create")
    onnx.add_argument("--task", required=True, choices=TASKS)
    onnx.add_argument("--dtype", choices=DTYPES, default="auto",
                      help="weights dtype of the graph (default: as stored in the checkpoint)")
    onnx.add_argument("--device", default=None, help="device to trace on (cpu, cuda); default cpu")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's; 23 is refused)")
    onnx.add_argument("--tolerance", type=float, default=None,
                      help="max absolute error of the verification (default: fp32 1e-4, fp16 2e-2, bf16 1e-1)")
    onnx.add_argument("--no-optimize", action="store_true", help="skip the exporter's graph optimisation (faster export, ~3x nodes)")
    onnx.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    onnx.set_defaults(run=run_onnx)
    from .peft_cli import configure_peft

    configure_peft(sub)


def run_onnx(args) -> int:
    import torch

    from .onnx_export import export_onnx_pretrained

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    manifest = export_onnx_pretrained(
        args.base, args.out, args.task, adapter=args.adapter, dtype=dtype, device=args.device,
        opset=args.opset, optimize=not args.no_optimize, tolerance=args.tolerance, overwrite=args.overwrite)
    v = manifest["verification"]
    print(f"wrote {manifest['path']}/model.onnx ({manifest['task']}, opset {manifest['opset']}, "
          f"{manifest['nodes']} nodes) in {manifest['export_seconds']:.1f} s")
    print(f"verified on {v['provider']}: max abs error {v['max_abs_error']:.3g}, max rel error "
          f"{v['max_rel_error']:.3g} (tolerance {v['tolerance']:g}, {len(v['cases'])} cases)")
    return 0
