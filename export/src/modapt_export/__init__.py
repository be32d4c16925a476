"""modapt-export: merge adapters into plain checkpoints, read/write PEFT adapters, export to ONNX."""

from .merge import MergeError, merge_checkpoint
from .peft_format import PeftFormatError, load_peft, save_peft
from .shards import CheckpointError
from .generate import greedy_generate
from .onnx_export import ExportError, export_onnx, export_onnx_pretrained
from .onnx_verify import VerificationError
from .ort_model import OrtModel

__all__ = ["CheckpointError", "ExportError", "MergeError", "OrtModel", "VerificationError", "export_onnx",
           "export_onnx_pretrained", "greedy_generate", "load_peft", "merge_checkpoint",
           "PeftFormatError", "save_peft"]
