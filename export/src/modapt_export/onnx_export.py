"""ONNX export of a (merged) model: trace, patch, save, verify, publish.

``export_onnx(model, out_dir, task=...)`` works on an in-memory model; ``export_onnx_pretrained``
loads a transformers checkpoint (and optionally a modapt adapter) first. Both write one export
directory::

    OUT_DIR/model.onnx            the graph (IR ≤ 10, never opset 23)
    OUT_DIR/model.onnx.data       external weights, for models above ``EXTERNAL_DATA_BYTES``
    OUT_DIR/config.json, tokenizer files
    OUT_DIR/modapt_export.json    task, inputs, outputs, verification figures

The export happens in a hidden sibling directory that is renamed to ``OUT_DIR`` only after the
verification passed, so a failed export leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

import modapt

from .onnx_io import check_task, cache_geometry, dynamic_shapes, io_names, make_inputs, wrap
from .onnx_verify import reference_outputs, verify
from .ort_model import MANIFEST, MODEL_FILE, OrtModel, import_onnxruntime

log = logging.getLogger("modapt_export")

#: initializers above this many bytes in total go to ``model.onnx.data``
EXTERNAL_DATA_BYTES = 256 * 2**20
#: opset 23 emits RotaryEmbedding/RMSNormalization/Attention, which fail in ONNX Runtime 1.32 for batch > 1
REFUSED_OPSETS = (23,)
#: the highest IR version written: onnxruntime(-gpu) ≥ 1.20 reads IR 10
MAX_IR_VERSION = 10


class ExportError(modapt.ModaptError):
    """The exporter could not trace or save the model."""


def export_onnx(model: torch.nn.Module, out_dir: str | os.PathLike, task: str, tokenizer=None, *,
                opset: int | None = None, optimize: bool = True, tolerance: float | None = None,
                verify_providers=None, external_data: bool | None = None, overwrite: bool = False,
                restore: bool = True, registry: modapt.Registry | None = None) -> dict:
    """Export ``model`` to ``out_dir/model.onnx`` for ``task`` and verify it; returns the manifest.

    :param model: a transformers model (``...ForCausalLM``, ``...ForSequenceClassification`` or
        the bare ``...Model`` for ``feature-extraction``), adapted by modapt or not. PyTorch's
        reference outputs are computed first, on the model as given; then weight adapters are
        folded into the weights (``modapt.merge``), every plugin's ``modapt_prepare_export``
        runs, and the model is traced. No copy of the model is made.
    :param restore: merge with ``unload=False`` and ``modapt.unmerge`` after tracing, so the
        caller's model is unchanged (bit-exact) afterwards; ``False`` merges with
        ``unload=True`` for good (the CLI, which owns its model). What a plugin's
        ``modapt_prepare_export`` changes beyond merging (LMAM: flash attention -> SDPA) stays.
    :param task: ``sequence-classification``, ``causal-lm`` or ``feature-extraction``.
    :param tokenizer: saved beside the graph when given.
    :param opset: ONNX opset (default: the exporter's); 23 is refused.
    :param tolerance: max absolute error allowed in verification (default by dtype: fp32 1e-4).
    :param verify_providers: ONNX Runtime providers for verification (default: CPU for fp32,
        CUDA when available for fp16/bf16).
    :param external_data: weights in ``model.onnx.data`` (default: when above 256 MiB).
    :raises VerificationError: ONNX Runtime differs from PyTorch; nothing is left at ``out_dir``.
    """
    check_task(task)
    adapters = _adapter_summary(model)
    if opset in REFUSED_OPSETS:
        raise modapt.ModaptError(f"opset {opset} is refused: its fused ops fail in ONNX Runtime for batch > 1; "
                                 "use 18-22 or 24+")
    import_onnxruntime()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise modapt.ModaptError(f"output directory '{out_dir}' exists and is not empty (pass overwrite=True / --overwrite)")
    registry = registry or modapt.default_registry()
    start = time.perf_counter()

    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    config = model.config
    model.eval()
    references = reference_outputs(model, task, config, dtype)
    merged_here = _merge_weight_adapters(model, unload=not restore)
    try:
        registry.call("modapt_prepare_export", model=model, task=task)
        proto = trace(model, task, opset=opset, optimize=optimize)
        registry.call("modapt_patch_onnx", onnx_model=proto, model=model, task=task)
    finally:
        if merged_here and restore:
            modapt.unmerge(model)
    _fix_versions(proto)
    opset_written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset_written in REFUSED_OPSETS:
        raise ExportError(f"the exporter wrote opset {opset_written}; pass opset=22 (or 24+)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        big = _initializer_bytes(proto) > EXTERNAL_DATA_BYTES if external_data is None else external_data
        _save(proto, tmp / MODEL_FILE, big)
        nodes = len(proto.graph.node)
        del proto
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if task == "causal-lm" and generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

        if verify_providers is None and dtype == torch.float32:
            verify_providers = ["CPUExecutionProvider"]  # CUDA's TF32 would blur an fp32 comparison
        ort_model = OrtModel(tmp, providers=verify_providers)
        report = verify(references, ort_model, task, dtype, tolerance)
        manifest = {
            "format": "modapt-onnx", "format_version": 1, "task": task,
            "model_type": getattr(config, "model_type", None), "architecture": type(model).__name__,
            "dtype": str(dtype).removeprefix("torch."), "exported_on": str(device),
            "opset": opset_written, "ir_version": min(MAX_IR_VERSION, _ir_of(tmp / MODEL_FILE)),
            "nodes": nodes, "external_data": big,
            "inputs": _describe(ort_model.session.get_inputs()), "outputs": _describe(ort_model.session.get_outputs()),
            "adapters": adapters,
            "verification": report,
            "versions": _versions(),
            "export_seconds": round(time.perf_counter() - start, 2),
        }
        if task == "causal-lm":
            geo = cache_geometry(config)
            manifest["cache"] = {"num_layers": geo.num_layers, "kv_heads": geo.kv_heads, "head_dim": geo.head_dim,
                                 "layout": "[batch, kv_heads, length, head_dim]"}
        del ort_model
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s: max abs error %.3g on %s", type(model).__name__, task, out_dir,
             report["max_abs_error"], report["provider"])
    manifest["path"] = str(out_dir)
    return manifest


def _merge_weight_adapters(model: torch.nn.Module, unload: bool) -> bool:
    """Fold weight adapters (and merge attachments) unless already done; True when merged here."""
    if not modapt.is_adapted(model):
        return False
    state = modapt.state_of(model)
    if state.unloaded or any(h.merged for h in state.layers.values()):
        return False
    modapt.merge(model, unload=unload)
    return True


def trace(model: torch.nn.Module, task: str, opset: int | None = None, optimize: bool = True):
    """``torch.onnx.export(dynamo=True)`` of the task wrapper; returns the ``onnx.ModelProto``.

    The sample is a padded batch of 2 (causal LM: left padding and a past of 3), so the mask
    code takes its general branch; dynamic batch, sequence (and past / total length).
    """
    param = next(model.parameters())
    config = model.config
    sample = make_inputs(task, config, batch=2, seq=5, past=3 if task == "causal-lm" else 0,
                         padding="left" if task == "causal-lm" else "right",
                         device=param.device, dtype=param.dtype)
    inputs, outputs = io_names(task, config)
    wrapper = wrap(model, task).eval()
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, tuple(sample[n] for n in inputs), dynamo=True, dynamic_shapes=dynamic_shapes(task, config),
                input_names=inputs, output_names=outputs, optimize=optimize, verbose=False, **kwargs)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__} ({task}): "
                          f"{type(exc).__name__}: {str(exc)[-2000:]}") from exc
    return program.model_proto


def _fix_versions(proto) -> None:
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION


def _initializer_bytes(proto) -> int:
    import numpy as np
    from onnx import helper

    total = 0
    for t in proto.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


def _save(proto, path: Path, external: bool) -> None:
    import onnx

    if external:
        # size_threshold stays at 1 KiB: shape constants must remain inline for ONNX Runtime
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _ir_of(path: Path) -> int:
    import onnx

    return onnx.load_model(str(path), load_external_data=False).ir_version


def _describe(values) -> list[dict]:
    return [{"name": v.name, "type": v.type, "shape": [d if isinstance(d, (int, str)) else None for d in v.shape]}
            for v in values]


def _adapter_summary(model) -> list[dict]:
    if not modapt.is_adapted(model):
        return []
    return modapt.state_of(model).recipe.to_dict()["adapter"]


def _versions() -> dict:
    import transformers

    ort = import_onnxruntime()
    try:
        import onnx
        onnx_version = onnx.__version__
    except ImportError:  # pragma: no cover
        onnx_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx_version,
            "onnxruntime": ort.__version__, "modapt": modapt.__version__}


AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification",
                "feature-extraction": "AutoModel"}


def load_for_export(base: str | os.PathLike, task: str, adapter: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, device: str | None = None):
    """Load a transformers checkpoint for ``task`` (and a modapt adapter on it). Returns
    ``(model, tokenizer or None)``."""
    import transformers

    check_task(task)
    base = Path(base)
    if not (base / "config.json").is_file():
        raise modapt.ModaptError(f"--base '{base}' is not a transformers checkpoint directory (no config.json)")
    cls = getattr(transformers, AUTO_CLASSES[task])
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = cls.from_pretrained(str(base), **kwargs)
    except (ValueError, OSError) as exc:
        raise modapt.ModaptError(f"cannot load '{base}' as {AUTO_CLASSES[task]}: {exc}") from exc
    if device:
        model.to(device)
    model.eval()
    if adapter is not None:
        model = modapt.load(model, str(adapter))
    tokenizer = None
    if any((base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
        except Exception as exc:  # noqa: BLE001 - a tokenizer is a convenience beside the graph
            log.warning("tokenizer in %s not copied: %s", base, exc)
    return model, tokenizer


def export_onnx_pretrained(base: str | os.PathLike, out_dir: str | os.PathLike, task: str,
                           adapter: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                           device: str | None = None, **kwargs) -> dict:
    """``modapt export onnx``: load ``base`` (+ ``adapter``), then :func:`export_onnx`."""
    model, tokenizer = load_for_export(base, task, adapter, dtype, device)
    kwargs.setdefault("restore", False)  # the model is ours: merge(unload=True), as a plain checkpoint would be
    return export_onnx(model, out_dir, task, tokenizer, **kwargs)
