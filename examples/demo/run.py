"""The main job (`make demo`). Placeholder until the demo issue lands: it will fine-tune the
embedded SmolLM2-135M on Rotten Tomatoes with composed adapters, merge, export to ONNX,
verify ONNX Runtime against PyTorch and report accuracy and latency."""

import sys

print(__doc__)
print("not implemented yet" + (" (quick mode)" if "--quick" in sys.argv else ""))
