"""The fast-path switches: which exact-but-faster paths the adapted layers take.

Every fast path here computes what its general path computes (tests compare the two); the
switches exist so that a test or a benchmark can run the general path on the same model and
compare results or timings. Production code never needs them: the defaults are the fast paths
that are on by default.

    with modapt.fast_paths(one_node=False):      # LoRA's module path, for comparison
        loss = model(x).sum()

The layers read :data:`current` at call time (one module attribute and one field read per
call, as cheap as the module-level booleans it replaces). The state is process-wide, not
per thread nor per model: switching it while another thread runs a model changes that
model's path too. :func:`fast_paths` restores the previous values on exit, so it nests.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class FastPaths:
    """One set of switch values.

    one_node: core LoRA's one-node layer (:meth:`modapt.lora.Lora.layer_output`); ``False``
        sends every LoRA call down the module path (base call, then the adapter's terms).
    map_one_node: MAP's one-node layer (``modapt_map.factored``) over a ``fused_low_rank``
        update; ``False`` sends every MAP layer through its general path.
    lorma_build_in_base_dtype: LoRMAπ's weight path builds T and W* in a bf16/fp16 base's
        dtype instead of the fp32 parameters' (off: T ≈ I rounded to bf16 loses diagonal
        changes below 2⁻⁸; faster build GEMMs on a GPU).
    lorma_recompute_weight: LoRMAπ's weight path rebuilds W* in backward instead of keeping
        it (off: out·in·d more work for one weight copy less).
    """

    one_node: bool = True
    map_one_node: bool = True
    lorma_build_in_base_dtype: bool = False
    lorma_recompute_weight: bool = False


#: the values in force; read by the layers at call time, replaced only by :func:`fast_paths`
current = FastPaths()


@contextlib.contextmanager
def fast_paths(*, one_node: bool | None = None, map_one_node: bool | None = None,
               lorma_build_in_base_dtype: bool | None = None,
               lorma_recompute_weight: bool | None = None) -> Iterator[FastPaths]:
    """Set the given switches (``None``: unchanged) inside the block; restore them on exit.

    Yields the :class:`FastPaths` in force. Process-wide and not thread-safe (module docstring).
    """
    global current
    given = {"one_node": one_node, "map_one_node": map_one_node,
             "lorma_build_in_base_dtype": lorma_build_in_base_dtype, "lorma_recompute_weight": lorma_recompute_weight}
    for name, value in given.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"fast_paths({name}=...) expects a bool, got {type(value).__name__}")
    previous = current
    current = dataclasses.replace(previous, **{k: v for k, v in given.items() if v is not None})
    try:
        yield current
    finally:
        current = previous
