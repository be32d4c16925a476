"""The recipe keys of ``method = "lmam"`` (LoRaDA, §3.2 and App. A.1 of the paper)."""

from __future__ import annotations

from typing import Literal

import pydantic

import modapt


class LmamOptions(modapt.Options):
    """Hyper-parameters of one LMAM adapter entry.

    heads: h_s, the number of LMAM heads; it must divide the model's number of query heads h
        (``num_attention_heads``); model head j uses LMAM head ``j mod h_s`` (eq. 17).
        ``None`` (default) means h_s = h.
    r: the rank of W_a [h_s, n, r] and W_b [h_s, r, n] (unused with ``full_rank``).
    n: the fixed token length of the map Attn_s [h_s, n, n].
    scale: s in Attn_s = ((W_a + P_a)(W_b + P_b)) · s (eq. 10). The paper uses s = 1 (BART),
        1/255 (RoBERTa-base) and 1/(4096·600) (LLaMA-7B).
    position: add the fixed positional terms P_a, P_b (eqs. 7-9); ``false`` is the paper's ¬P.
    align: ``"head"`` adds the map to the first n tokens (eqs. 14-15); ``"tail"`` to the last
        n tokens (eq. 16).
    init: ``"zero"`` (default): W_a = −P_a and W_b ~ N(0, 1/r), so Attn_s = 0 exactly at start
        while W_a gets a gradient (as LoRA's B = 0); ``"random"``: W_a, W_b ~ N(0, 1/r)
        (FMAM: ``zero`` is W = 0, ``random`` is W ~ N(0, 1/n)).
    nonnegative: the paper's ablations without negative attention: ``true`` is ¬N
        (Attn = softmax(QKᵀ/√d + Attn_s), the map moves inside the softmax); ``"softmax"``
        is ¬S (Attn = softmax(QKᵀ/√d) + softmax(Attn_s)). ``false`` (default) is LMAM.
    full_rank: the paper's ¬L (FMAM): a full map ``lmam_W`` [h_s, n, n] instead of W_a W_b.
    """

    heads: int | None = pydantic.Field(None, gt=0, description="h_s, LMAM heads (divides num_attention_heads; "
                                                              "default: all heads)")
    r: int = pydantic.Field(2, gt=0, description="rank of W_a [h_s, n, r] and W_b [h_s, r, n]")
    n: int = pydantic.Field(128, gt=0, description="fixed token length of the map Attn_s [h_s, n, n]")
    scale: float = pydantic.Field(1.0, description="s in Attn_s = ((W_a + P_a)(W_b + P_b)) · s")
    position: bool = pydantic.Field(True, description="add the positional terms P_a, P_b (false: the paper's ¬P)")
    align: Literal["head", "tail"] = pydantic.Field("head", description="add the map to the first or last n tokens")
    init: Literal["zero", "random"] = pydantic.Field(
        "zero", description="zero: W_a = -P_a so Attn_s = 0 at start; random: W_a, W_b ~ N(0, 1/r)")
    nonnegative: bool | Literal["softmax"] = pydantic.Field(
        False, description="ablations without negative attention: true = ¬N (map inside the softmax), "
                           "'softmax' = ¬S (softmax of the map added)")
    full_rank: bool = pydantic.Field(False, description="the paper's ¬L (FMAM): a full map lmam_W [h_s, n, n]")

    @pydantic.field_validator("nonnegative", mode="before")
    @classmethod
    def _nonnegative_value(cls, value):
        if value is True or value is False or value == "softmax":
            return value
        raise ValueError(f"nonnegative accepts false (LMAM), true (the paper's ¬N) or \"softmax\" (¬S); got {value!r}")

    @pydantic.model_validator(mode="after")
    def _rank_fits(self):
        if not self.full_rank and self.r > self.n:
            raise ValueError(f"r = {self.r} exceeds n = {self.n}: the map would not be low-rank "
                             "(lower r, or set full_rank = true for a full map)")
        return self
