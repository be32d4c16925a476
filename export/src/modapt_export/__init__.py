"""modapt-export: merge adapters into plain checkpoints, read/write PEFT adapters, export to ONNX."""
