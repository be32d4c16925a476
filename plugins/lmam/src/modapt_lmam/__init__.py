"""modapt-lmam: LMAM, the low-rank multi-head attention-map adapter of LoRaDA.

    Attn^ = softmax(QKᵀ/√d_h) + Attn_s,   Attn_s = ((W_a + P_a)(W_b + P_b)) · s   [h_s, n, n]

added to every self-attention module through transformers' attention interface, without an
N×N map. See the README for the equations, shapes and choices.
"""

from .attachment import LmamAttachment, build
from .options import LmamOptions

__all__ = ["LmamAttachment", "LmamOptions", "build"]
