"""modapt-export: merge adapters into plain checkpoints, read/write PEFT adapters, export to ONNX."""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_export.plugin) imports this package first, and
# `modapt plugins` must not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "MergeError": "merge", "merge_checkpoint": "merge",
    "PeftFormatError": "peft_format", "load_peft": "peft_format", "save_peft": "peft_format",
    "CheckpointError": "shards", "greedy_generate": "generate",
    "ExportError": "onnx_export", "export_onnx": "onnx_export", "export_onnx_pretrained": "onnx_export",
    "VerificationError": "onnx_verify", "OrtModel": "ort_model"})

__all__ = ["CheckpointError", "ExportError", "MergeError", "OrtModel", "VerificationError", "export_onnx",
           "export_onnx_pretrained", "greedy_generate", "load_peft", "merge_checkpoint",
           "PeftFormatError", "save_peft"]
