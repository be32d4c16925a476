"""``OrtModel``: run an exported graph with ONNX Runtime on CPU or CUDA.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` are alternative extras of this distribution
(``modapt-export[cpu]`` / ``modapt-export[gpu]``); both install the module ``onnxruntime`` and
shadow each other, so only one may be installed. With the CUDA provider available it is used and
inputs/outputs are bound on the GPU (IO binding), so nothing crosses to the host between steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

import modapt

log = logging.getLogger("modapt_export")

MANIFEST = "modapt_export.json"
MODEL_FILE = "model.onnx"

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise modapt.ModaptError(
            "onnxruntime is not installed: install modapt-export[cpu] (or modapt-export[gpu] for CUDA)") from exc
    return onnxruntime


def default_providers() -> list[str]:
    """CUDA then CPU when the CUDA provider exists, else CPU (TensorRT is left out: it builds
    engines on first run and needs its own libraries)."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def resolve_model_path(path: str | Path) -> Path:
    """An export directory (holding ``model.onnx``) or a ``.onnx`` file."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise modapt.ModaptError(f"no ONNX model at '{file}' (expected an export directory or a .onnx file)")
    return file


class OrtModel:
    """An ONNX Runtime session over an exported model.

    :param path: an export directory (``model.onnx`` + ``modapt_export.json``) or a ``.onnx`` file.
    :param providers: ONNX Runtime provider list (names or ``(name, options)`` pairs); default
        CUDA when available, then CPU. The provider that actually runs is logged and is
        :attr:`provider`.
    :param session_options: an ``onnxruntime.SessionOptions`` (default: all graph optimisations).
    """

    def __init__(self, path: str | Path, providers: Sequence | None = None, session_options=None):
        ort = import_onnxruntime()
        self.path = resolve_model_path(path)
        manifest = self.path.parent / MANIFEST
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session_options.log_severity_level = 3
        providers = list(providers) if providers else default_providers()
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # initializers that are also graph inputs (adapter tensors of an --adapters-as-inputs export):
        # optional inputs with defaults, fed directly or through an active LoraAdapter
        self.optional_input_names = [i.name for i in self.session.get_overridable_initializers()]
        self._input_types = {i.name: _ORT_TO_NUMPY.get(i.type)
                             for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        log.info("OrtModel %s runs on %s (session providers: %s)", self.path, self.provider,
                 ", ".join(self.session.get_providers()))

    @property
    def task(self) -> str | None:
        return self.manifest.get("task")

    def _check_inputs(self, names) -> None:
        missing = [n for n in self.input_names if n not in names]
        extra = [n for n in names if n not in self.input_names and n not in self.optional_input_names]
        if missing or extra:
            raise modapt.ModaptError(f"inputs of {self.path.name}: missing {missing}, unexpected {extra}; "
                                     f"the graph takes {self.input_names}")

    def run(self, inputs: Mapping[str, np.ndarray | torch.Tensor], output_names: Sequence[str] | None = None,
            run_options=None) -> dict[str, np.ndarray]:
        """Host path: numpy (or CPU torch) in, numpy out, ``{output name: array}``. ``run_options``
        (an ``onnxruntime.RunOptions``) carries active adapters (``add_active_adapter``)."""
        self._check_inputs(inputs)
        feeds = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in inputs.items()}
        feeds = {k: v.astype(self._input_types[k], copy=False) if self._input_types.get(k) else v for k, v in feeds.items()}
        names = list(output_names or self.output_names)
        return dict(zip(names, self.session.run(names, feeds, run_options)))

    def bind(self, inputs: Mapping[str, torch.Tensor], output_names: Sequence[str] | None = None):
        """IO binding over torch tensors: inputs are read where they live (no copy; CUDA tensors
        stay on the GPU) and outputs are allocated by ONNX Runtime on the provider's device.
        Returns the ``IOBinding``; run it with :meth:`run_binding`."""
        self._check_inputs(inputs)
        io = self.session.io_binding()
        keep = []
        for name, t in inputs.items():
            t = t.contiguous()
            want = _TORCH_DTYPE.get(self._input_types.get(name))
            if want is not None and t.dtype != want:
                t = t.to(want)
            if t.numel() == 0:  # an empty past has no buffer to point at
                io.bind_cpu_input(name, t.cpu().numpy())
                continue
            keep.append(t)
            device = "cuda" if t.is_cuda else "cpu"
            io.bind_input(name, device, t.device.index or 0, _numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        out_device = "cuda" if self.on_cuda else "cpu"
        for name in output_names or self.output_names:
            io.bind_output(name, out_device)
        io.modapt_keepalive = keep  # the bound buffers must outlive the run
        return io

    def run_binding(self, io, run_options=None) -> None:
        self.session.run_with_iobinding(io, run_options)

    def run_torch(self, inputs: Mapping[str, torch.Tensor], output_names: Sequence[str] | None = None,
                  run_options=None) -> dict[str, torch.Tensor]:
        """Torch in, torch out. On CUDA: IO binding, outputs stay on the GPU (DLPack, no copy).
        On CPU: the numpy path (zero-copy where dtypes match)."""
        names = list(output_names or self.output_names)
        if not self.on_cuda:
            return {k: torch.from_numpy(v) for k, v in self.run(inputs, names, run_options).items()}
        io = self.bind(inputs, names)
        self.run_binding(io, run_options)
        return dict(zip(names, (_ortvalue_to_torch(v) for v in io.get_outputs())))

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run_torch(inputs)


_TORCH_DTYPE = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64,
                np.int32: torch.int32, np.bool_: torch.bool, np.float64: torch.float64}



def node_times(trace_file: str | Path, runs: int, provider: str | None = None) -> dict[str, dict]:
    """Per run, how often each op type ran and its summed node time, from ONNX Runtime's profile.

    ``trace_file`` is what ``InferenceSession.end_profiling()`` returns for a session run ``runs``
    times. Returns ``{op: {"calls": float, "us": float}}``, the most expensive first. An op that
    ran on a provider other than ``provider`` is listed apart as ``"Op [Provider]"`` (without the
    ``ExecutionProvider`` suffix). Node times are host-side: on CUDA a launch is asynchronous, so
    a node shows its launch cost, while a copy between host and device or a node placed on the
    CPU shows its whole cost.
    """
    by_op: dict[str, dict] = {}
    for event in json.loads(Path(trace_file).read_text()):
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        op = args.get("op_name", "?")
        if provider is not None and args.get("provider") not in (None, provider):
            op += f" [{args['provider'].removesuffix('ExecutionProvider')}]"
        entry = by_op.setdefault(op, {"calls": 0, "us": 0.0})
        entry["calls"] += 1
        entry["us"] += event.get("dur", 0)
    per_run = {op: {"calls": e["calls"] / runs, "us": e["us"] / runs} for op, e in by_op.items()}
    return dict(sorted(per_run.items(), key=lambda kv: -kv[1]["us"]))

def _numpy_dtype(dtype: torch.dtype):
    return {t: n for n, t in _TORCH_DTYPE.items()}[dtype]


def _ortvalue_to_torch(value) -> torch.Tensor:
    """Zero-copy through DLPack when this onnxruntime build offers it, else through the host."""
    try:
        return torch.from_dlpack(value._ortvalue.to_dlpack())
    except Exception:  # noqa: BLE001 - older builds lack to_dlpack; copying is correct, only slower
        device = "cuda" if value.device_name().lower() == "cuda" else "cpu"
        return torch.from_numpy(value.numpy()).to(device)
