"""The presets: the compositions the papers evaluated, as recipe data with their defaults.

Each preset is a plain recipe mapping (``{"adapter": [...]}``) that names methods as strings,
so this module imports no method plugin; using a preset whose methods are not installed is an
error from the core naming the distributions to install.

Targets are module-name suffixes of LLaMA-style models (``q_proj`` … ``down_proj``). For
GPT-2 (``c_attn``, ``c_fc``…) or BERT (``query``, ``value``…) override them:
``[overrides.lora] targets = ["c_attn"]``. LMAM and the bottleneck adapter need no targets:
they find the attention modules / transformer blocks themselves.

Where a paper is silent the choice is written next to the value (and in the README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# LLaMA module suffixes, named after the papers' "Where" rows
QKV_UP_DOWN = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # map.txt Table 6: Q, K, V, Up, Down
QKV_UP_DOWN_LMAM = QKV_UP_DOWN  # LoRA/DoRA baselines of lorada-lmam Table 18 (DoRA's commonsense setup)
O_DOWN = ["o_proj", "down_proj"]  # lorada-lmam.txt Table 19: "Where/LoRA: O, Down"
Q_V = ["q_proj", "v_proj"]  # lorada-lmam.txt Table 17: modules (q_proj, v_proj)
UP_DOWN_O_GATE = ["up_proj", "down_proj", "o_proj", "gate_proj"]  # lorma.txt App.: LLaMA-3-8B "U, D, O, G"

# LMAM of LoRaDA-LA on LLaMA-7B (lorada-lmam.txt Table 19): r = 2, n = 128, h_s = 32 (all heads:
# our default heads = None), 1/s = 4096·600.
LMAM_LLAMA = {"method": "lmam", "r": 2, "n": 128, "scale": 1.0 / (4096 * 600)}


@dataclass(frozen=True)
class PresetSpec:
    """One preset: its recipe, where its defaults come from, and one line about it."""

    name: str
    recipe: dict[str, Any]
    citation: str
    description: str
    notes: list[str] = field(default_factory=list)  # the choices made where the paper is silent


PRESETS: tuple[PresetSpec, ...] = (
    PresetSpec(
        "lomap",
        {"adapter": [{"method": "map", "targets": QKV_UP_DOWN,
                      "update": {"method": "lora", "r": 16, "lora_alpha": 32.0, "dropout": 0.05}}]},
        "map.txt (MAP, Si et al.), Table 1 (results) and Table 6 (LLaMA3-8B: r 16, α 32, dropout 0.05, Q K V Up Down)",
        "LoMAP: MAP over LoRA",
        [("MAP's init is the plugin default 'identity' (the MAP README's measurement); "
         "[overrides.map] init = \"paper\" gives α = ‖W0‖_F, β = 1")],
    ),
    PresetSpec(
        "adalomap",
        {"adapter": [{"method": "map", "targets": QKV_UP_DOWN,
                      "update": {"method": "adalora", "init_r": 24, "target_r": 16, "lora_alpha": 32.0,
                                 "dropout": 0.05}}]},
        "map.txt (MAP, Si et al.), Table 4 (AdaLoMAP on LLaMA3-8B, r 16) with Table 6's α, dropout and targets",
        "AdaLoMAP: MAP over AdaLoRA (needs [overrides.adalora] total_step = <optimizer steps>)",
        [("target_r 16 is Table 4's r; init_r 24 = 1.5 × target_r (AdaLoRA's b(0) = 1.5·b(T)); "
         "total_step is the length of your run, so the preset leaves it to [overrides.adalora] total_step")],
    ),
    PresetSpec(
        "flomap",
        {"adapter": [{"method": "map", "targets": QKV_UP_DOWN,
                      "update": {"method": "flora", "r": 16, "lora_alpha": 32.0, "dropout": 0.05}}]},
        "map.txt (MAP, Si et al.), Table 4 (FLoMAP on LLaMA3-8B, r 16) with Table 6's α, dropout and targets",
        "FLoMAP: MAP over FLoRA",
    ),
    PresetSpec(
        "lora+lmam",
        {"adapter": [{"method": "lora", "targets": QKV_UP_DOWN_LMAM, "r": 4, "lora_alpha": 8.0, "dropout": 0.05},
                     dict(LMAM_LLAMA)]},
        "lorada-lmam.txt (LoRaDA), Tables 6 and 18 (LLaMA-7B, LoRA rank 4 + LMAM); LMAM as Table 19",
        "LoRA + LMAM",
        [("LoRA α = 2r and dropout 0.05 as Table 19; targets Q K V Up Down (the DoRA setup the baseline "
         "comes from)")],
    ),
    PresetSpec(
        "dora+lmam",
        {"adapter": [{"method": "dora", "targets": QKV_UP_DOWN_LMAM,
                      "update": {"method": "lora", "r": 4, "lora_alpha": 8.0, "dropout": 0.05}},
                     dict(LMAM_LLAMA)]},
        "lorada-lmam.txt (LoRaDA), Table 18 (LLaMA-7B, DoRA rank 4 + LMAM); LMAM as Table 19",
        "DoRA + LMAM",
        ["as lora+lmam: α = 2r, dropout 0.05, Q K V Up Down"],
    ),
    PresetSpec(
        "quanta+lmam",
        {"adapter": [{"method": "quanta", "targets": Q_V, "num_axes": 4},
                     {"method": "lmam", "r": 1, "n": 128, "scale": 1.0 / (4096 * 600)}]},
        "lorada-lmam.txt (LoRaDA-Q), Table 6 (results) and Table 17 (N 4, q_proj v_proj, LMAM r 1, n 128)",
        "LoRaDA-Q: QuanTA + LMAM",
        [("N = 4 axes factored automatically (Table 17's 16-8-8-4 for 4096 is what [overrides.quanta] "
         "dims = [16, 8, 8, 4] gives); Table 17 gives no LMAM scale: 1/(4096·600) as Table 19")],
    ),
    PresetSpec(
        "adapter-ffn+lmam",
        {"adapter": [{"method": "bottleneck", "placement": "ffn", "r": 16, "scale": 2.0},
                     {"method": "lmam", "r": 3, "n": 256, "scale": 1.0 / 255}]},
        "lorada-lmam.txt (LoRaDA-A), Table 5 (RoBERTa-base GLUE) and Table 16 (adapter r 16, scale 2; LMAM r 3, "
        "n 256, 1/s 255)",
        "LoRaDA-A: Adapter-FFN + LMAM",
        ["Table 16 uses n 512 or 256 by task: 256"],
    ),
    PresetSpec(
        "lora+adapter-ffn+lmam",
        {"adapter": [{"method": "lora", "targets": O_DOWN, "r": 2, "lora_alpha": 4.0, "dropout": 0.05},
                     {"method": "bottleneck", "placement": "ffn", "r": 18, "scale": 4.0},
                     dict(LMAM_LLAMA)]},
        "lorada-lmam.txt (LoRaDA-LA), Table 4 (results) and Table 19 (LLaMA-7B: LoRA r 1–2 on O, Down; "
        "adapter r 18, scale 4; LMAM r 2, n 128, 1/s 4096·600)",
        "LoRaDA-LA: LoRA + Adapter-FFN + LMAM",
        ["LoRA r 2, α 4 (Table 19's LLaMA3-8B choice; LLaMA-7B underlines r 1, α 2)"],
    ),
    PresetSpec(
        "parallel+lmam",
        {"adapter": [{"method": "bottleneck", "placement": "parallel", "r": 256}, dict(LMAM_LLAMA)]},
        "lorada-lmam.txt (LoRaDA), Table 6 (LLaMA-7B, Parallel + LMAM); LMAM as Table 19",
        "Parallel adapter + LMAM",
        [("the paper gives no Parallel hyper-parameters; bottleneck 256 is LLM-Adapters' parallel setting "
         "that its baseline numbers come from")],
    ),
    PresetSpec(
        "lorma-plus",
        {"adapter": [{"method": "lorma", "targets": UP_DOWN_O_GATE, "r": 8, "lora_alpha": 8.0,
                      "inflation": "plus", "side": "pre"}]},
        "lorma.txt (LoRMA), Table 4 (LLaMA-3-8B, MetaMath) and Table 17 (r 8, pre-multiplication; U D O G)",
        "LoRMA+: W = (I + (α/r)·BA)·W0",
        ["α = r (Table 10's scaling α = r)"],
    ),
    PresetSpec(
        "lorma-pi",
        {"adapter": [{"method": "lorma", "targets": UP_DOWN_O_GATE, "r": 8, "lora_alpha": 8.0,
                      "inflation": "pi", "side": "pre"}]},
        "lorma.txt (LoRMA), Tables 2–3 (LoRMAπ) with LoRMA+'s LLaMA-3-8B settings of Table 17",
        "LoRMAπ: W = (α/r)·Iπ(BA)·W0",
        ["the paper gives LLaMA settings for LoRMA+ only: LoRMAπ takes the same"],
    ),
)


def methods_of(recipe: dict[str, Any]) -> list[str]:
    """The methods a preset recipe names, nested updates included, in order, without repeats."""
    names: list[str] = []
    for entry in recipe.get("adapter", []):
        for table in (entry, entry.get("update")):
            if isinstance(table, dict) and table.get("method") and table["method"] not in names:
                names.append(table["method"])
    return names
