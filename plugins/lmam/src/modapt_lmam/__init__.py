"""modapt-lmam: LMAM, the low-rank multi-head attention-map adapter of LoRaDA.

    Attn^ = softmax(QKᵀ/√d_h) + Attn_s,   Attn_s = ((W_a + P_a)(W_b + P_b)) · s   [h_s, n, n]

added to every self-attention module through transformers' attention interface, without an
N×N map. See the README for the equations, shapes and choices.
"""

from modapt import lazy_exports

# imported on first use: the entry module (modapt_lmam.plugin) imports this package first
__getattr__, __dir__ = lazy_exports(__name__, {"LmamAttachment": "attachment", "build": "attachment",
                                               "LmamOptions": "options"})

__all__ = ["LmamAttachment", "LmamOptions", "build"]
