"""``modapt export onnx``: export a transformers checkpoint (plus a modapt adapter) to a verified ONNX graph."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from modapt.cli import finite_float
from modapt.errors import ModaptError

from .onnx_io import TASKS

DTYPES = ("auto", "float32", "float16", "bfloat16")
# what torch.onnx.export(dynamo=True) writes and ONNX Runtime 1.32 runs (docs: onnx export
# facts): below 18 the exporter prints a traceback and silently writes opset 18; 23's fused ops
# fail in ONNX Runtime for batch > 1 (refused again, with the reason, by export_onnx)
MIN_OPSET, MAX_OPSET, REFUSED_OPSET = 18, 25, 23
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def opset(text: str) -> int:
    """argparse ``type=`` for ``--opset``: an opset the exporter and ONNX Runtime both support."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not MIN_OPSET <= value <= MAX_OPSET or value == REFUSED_OPSET:
        raise argparse.ArgumentTypeError(
            f"opset {value} is not supported: use {MIN_OPSET}-{REFUSED_OPSET - 1} or {REFUSED_OPSET + 1}-{MAX_OPSET} "
            f"(opset {REFUSED_OPSET}'s fused ops fail in ONNX Runtime for batch > 1)")
    return value


def tolerance(text: str) -> float:
    """argparse ``type=`` for ``--tolerance``: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not > 0")
    return value


def check_device(device: str | None) -> None:
    """Refuse a device that does not exist here before anything is loaded (one line, exit 1)."""
    if device is None:
        return
    if not DEVICE.fullmatch(device):
        raise ModaptError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModaptError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                              f"{'built without CUDA' if torch.version.cuda is None else 'no usable GPU'}); "
                              "use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModaptError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_paths(args) -> None:
    """Refuse an ``--out`` that is a file or overlaps an input, and inputs that are not folders."""
    base, out = Path(args.base), Path(args.out)
    if not base.is_dir():
        raise ModaptError(f"--base {base}: not a transformers checkpoint directory (no such folder)")
    adapters = [Path(a) for a in args.adapter or []]  # --adapter repeats (with --adapters-as-inputs)
    for adapter in adapters:
        if not adapter.is_dir():
            raise ModaptError(f"--adapter {adapter}: not a folder")
        if not (adapter / "adapter_config.json").is_file():
            raise ModaptError(f"--adapter {adapter}: no adapter_config.json (not a modapt or PEFT adapter folder)")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ModaptError(f"--out {out} exists and is not a folder; choose a folder name")
    from .merge import refuse_overlap

    refuse_overlap(out, {"base": base, **{f"adapter {a}": a for a in adapters}})


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    sub.required = True
    onnx = sub.add_parser(
        "onnx", help="export to model.onnx for ONNX Runtime and verify it against PyTorch",
        description="Load --base (and --adapter, a modapt or PEFT folder), fold weight adapters into the weights, "
                    "export with torch.onnx.export(dynamo=True), verify ONNX Runtime against PyTorch and write OUT_DIR "
                    "(model.onnx, config, tokenizer, modapt_export.json; causal LM: genai_config.json for ONNX "
                    "Runtime GenAI). With --adapters-as-inputs the adapters stay unmerged as graph inputs and each "
                    "is written to OUT_DIR/adapters/<name>.onnx_adapter. A failed verification leaves no OUT_DIR.")
    onnx.add_argument("--base", required=True, metavar="MODEL_DIR", help="transformers checkpoint directory")
    onnx.add_argument("--adapter", metavar="ADAPTER_DIR", action="append",
                      help="adapter folder, modapt (modapt.save) or PEFT; repeat it with --adapters-as-inputs")
    onnx.add_argument("--adapters-as-inputs", action="store_true",
                      help="write the base graph once with the adapters' tensors as graph inputs (default: no adapter) "
                           "and one adapters/<name>.onnx_adapter per --adapter, switchable per request")
    onnx.add_argument("--quiet", action="store_true", help="no stage reports on stderr")
    onnx.add_argument("--out", required=True, metavar="OUT_DIR", help="export directory to create")
    onnx.add_argument("--task", required=True, choices=TASKS)
    onnx.add_argument("--dtype", choices=DTYPES, default="auto",
                      help="weights dtype of the graph (default: as stored in the checkpoint)")
    onnx.add_argument("--device", default=None, help="device to trace on (cpu, cuda); default cpu")
    onnx.add_argument("--opset", type=opset, default=None,
                      help=f"ONNX opset, {MIN_OPSET}-{MAX_OPSET} (default: the exporter's, 20; {REFUSED_OPSET} is refused)")
    onnx.add_argument("--tolerance", type=tolerance, default=None,
                      help="max absolute error of the verification (default: fp32 1e-4, fp16 2e-2, bf16 1e-1)")
    onnx.add_argument("--no-optimize", action="store_true", help="skip the exporter's graph optimisation (faster export, ~3x nodes)")
    onnx.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    onnx.set_defaults(run=run_onnx)
    from .peft_cli import configure_peft

    configure_peft(sub)


def run_onnx(args) -> int:
    check_paths(args)
    check_device(args.device)
    import torch

    from .onnx_export import export_onnx_pretrained

    from .progress import Progress

    if args.quiet:  # transformers' "Loading weights" bar and the exporter's notes are stage reports too
        import logging

        import transformers

        transformers.utils.logging.disable_progress_bar()
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed. Skipping..."
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    manifest = export_onnx_pretrained(
        args.base, args.out, args.task, adapter=args.adapter, dtype=dtype, device=args.device,
        adapters_as_inputs=args.adapters_as_inputs, progress=Progress(quiet=args.quiet),
        opset=args.opset, optimize=not args.no_optimize, tolerance=args.tolerance, overwrite=args.overwrite)
    v = manifest["verification"]
    print(f"wrote {manifest['path']}/model.onnx ({manifest['task']}, opset {manifest['opset']}, "
          f"{manifest['nodes']} nodes) in {manifest['export_seconds']:.1f} s")
    print(f"verified on {v['provider']}: max abs error {v['max_abs_error']:.3g}, max rel error "
          f"{v['max_rel_error']:.3g} (tolerance {v['tolerance']:g}, {len(v['cases'])} cases)")
    for name, rel in manifest.get("adapter_files", {}).items():
        a = v["adapters"][name]
        print(f"adapter {name}: {manifest['path']}/{rel}, verified through LoraAdapter: max abs error "
              f"{a['max_abs_error']:.3g}")
    if manifest.get("genai_check"):
        print(f"onnxruntime-genai greedy generation equals generate ({manifest['genai_check']['new_tokens']} tokens)")
    return 0
