"""QuanTA passes the conformance suite on tiny LLaMA, GPT-2 (Conv1D, non-square) and BERT."""

from typing import ClassVar

import modapt_quanta.plugin
from modapt.testing.conformance import MethodConformance


class TestQuantaConformance(MethodConformance):
    plugins: ClassVar[dict] = {"quanta": modapt_quanta.plugin}
    recipes: ClassVar[dict] = {
        # square projections with the paper's N = 4 axes (64 = 4·4·2·2); non-square up/down (96 <-> 64)
        "llama": {"adapter": [{"method": "quanta", "dims": [4, 4, 2, 2], "dropout": 0.1,
                               "targets": ["q_proj", "v_proj", "down_proj"]}]},
        "gpt2": {"adapter": [{"method": "quanta", "num_axes": 3, "targets": ["c_attn", "c_proj"]}]},
        "bert": {"adapter": [{"method": "quanta", "targets": ["query", "value"]}],
                 "modules_to_save": ["classifier"]},
    }
