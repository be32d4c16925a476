"""modapt-export: merge adapters into plain checkpoints, read/write PEFT adapters, export to ONNX."""

from .merge import MergeError, merge_checkpoint
from .shards import CheckpointError

__all__ = ["CheckpointError", "MergeError", "merge_checkpoint"]
