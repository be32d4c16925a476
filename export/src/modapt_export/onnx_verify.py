"""Verification of an exported graph: ONNX Runtime against PyTorch on the same inputs.

Several batch / sequence (/ past) sizes, padded rows included; only real-token positions are
compared (a fully masked query row is undefined: torch and ONNX Runtime disagree there, and
nothing downstream reads it). The error is reported as max absolute error and max relative
error (absolute error divided by the largest reference magnitude of that output).
"""

from __future__ import annotations

import math

import torch

import modapt

from .onnx_io import make_inputs, wrap

#: max absolute error allowed, by the dtype of the exported weights
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}

#: (batch, seq, past, padding) of the verification cases
ENCODER_CASES = [(1, 1, 0, "none"), (1, 7, 0, "none"), (2, 8, 0, "right"), (3, 5, 0, "left"), (4, 16, 0, "right")]
CAUSAL_CASES = [(1, 1, 0, "none"), (1, 6, 0, "none"), (2, 7, 0, "left"), (3, 1, 6, "left"), (2, 4, 5, "left")]


class VerificationError(modapt.ModaptError):
    """ONNX Runtime's output differs from PyTorch's beyond the tolerance; ``report`` has the figures."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _real_positions(name: str, out: torch.Tensor, feeds: dict, task: str) -> torch.Tensor:
    """The entries of one output that belong to real tokens (a 1-D tensor)."""
    mask = feeds["attention_mask"].bool()
    if task == "sequence-classification":
        return out.reshape(-1)
    if name.startswith("present."):  # [batch, kv_heads, total, head_dim]: mask over total
        return out.transpose(1, 2)[mask].reshape(-1)
    seq = feeds["input_ids"].shape[1]
    return out[mask[:, -seq:]].reshape(-1)  # [batch, seq, ...] -> real rows


def reference_outputs(model: torch.nn.Module, task: str, config, dtype: torch.dtype, cases=None) -> list:
    """PyTorch's outputs on every verification case, computed on ``model`` as the user has it
    (adapters unmerged) before the exporter touches it. Returns ``[(case, feeds, outputs)]``
    with feeds on the model's device and outputs on the CPU."""
    cases = cases or (CAUSAL_CASES if task == "causal-lm" else ENCODER_CASES)
    wrapper = wrap(model, task).eval()
    device = next(model.parameters()).device
    refs = []
    for seed, case in enumerate(cases):
        batch, seq, past, padding = case
        feeds = make_inputs(task, config, batch, seq, past, padding, seed=seed, device=device, dtype=dtype)
        with torch.no_grad():
            out = wrapper(*feeds.values())
        out = out if isinstance(out, tuple) else (out,)
        refs.append((case, feeds, [o.detach().cpu() for o in out]))
    return refs


def verify(references: list, ort_model, task: str, dtype: torch.dtype, tolerance: float | None = None,
           run_options=None, label: str = "") -> dict:
    """Compare ``ort_model`` (an :class:`OrtModel`) with ``references`` (from
    :func:`reference_outputs`) on real-token positions. Returns the report; raises
    :class:`VerificationError` when an error exceeds the tolerance or is not finite. ``run_options``
    (``onnxruntime.RunOptions``) activates an adapter; ``label`` names it in the error."""
    tolerance = TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
    results, worst_abs, worst_rel = [], 0.0, 0.0
    for (batch, seq, past, padding), feeds, ref in references:
        got = ort_model.run_torch(feeds if ort_model.on_cuda else {k: v.cpu() for k, v in feeds.items()},
                                  run_options=run_options)
        cpu_feeds = {k: v.cpu() for k, v in feeds.items()}
        case_abs, case_rel = 0.0, 0.0
        for name, r in zip(ort_model.output_names, ref):
            r = _real_positions(name, r.float(), cpu_feeds, task)
            g = _real_positions(name, got[name].float().cpu(), cpu_feeds, task)
            diff = (r - g).abs().max().item() if r.numel() else 0.0
            scale = r.abs().max().item() if r.numel() else 0.0
            if not math.isfinite(diff):
                diff = math.inf
            case_abs = max(case_abs, diff)
            case_rel = max(case_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
        results.append({"batch": batch, "seq": seq, "past": past, "padding": padding,
                        "max_abs_error": case_abs, "max_rel_error": case_rel})
        worst_abs, worst_rel = max(worst_abs, case_abs), max(worst_rel, case_rel)
    report = {"passed": worst_abs <= tolerance, "tolerance": tolerance, "provider": ort_model.provider,
              "max_abs_error": worst_abs, "max_rel_error": worst_rel, "cases": results}
    if not report["passed"]:
        bad = [c for c in results if not c["max_abs_error"] <= tolerance]
        raise VerificationError(
            f"ONNX Runtime ({ort_model.provider}){label} differs from PyTorch: max abs error {worst_abs:.3g} "
            f"(max rel {worst_rel:.3g}) > tolerance {tolerance:g}; failing cases (batch, seq, past, padding): "
            + ", ".join(f"({c['batch']}, {c['seq']}, {c['past']}, {c['padding']}): {c['max_abs_error']:.3g}" for c in bad),
            report)
    return report
