"""Which modules of a model a recipe entry adapts.

A target is a module-name suffix (``q_proj`` matches ``model.layers.0.self_attn.q_proj``),
a regular expression prefixed ``re:`` (matched against the whole name), a module class name
(``LlamaAttention``), or ``all-linear``: every linear layer except the model's output layer
(its output embeddings and a classification head).

Regular expressions come from recipes, from saved adapters (strangers' files) and from PEFT
configs, and Python's backtracking engine runs some of them for ever (``(.*.*)*X`` on a
60-character name). :func:`regex_problem` refuses, before any match, the shapes that backtrack
exponentially or in a high-degree polynomial: a quantifier over a group that holds another
quantifier or an alternation, more than ``MAX_OPEN_REPEATS`` unbounded quantifiers, or a
pattern longer than ``MAX_PATTERN_CHARS``. What passes costs at most O(n^4) steps on an
n-character module name.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from .errors import TargetError

if TYPE_CHECKING:  # torch is imported by the functions that match, so `recipe check` stays light
    from torch import nn

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")
MAX_PATTERN_CHARS = 500
# k unbounded quantifiers in a row cost ~C(n+k, k) steps on a failing n-character name: with
# k = 4 and n = 80 about 2e6; PEFT's longest documented target patterns have 3
MAX_OPEN_REPEATS = 4


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is refused as a target regex (invalid, or may backtrack for ever), or ``None``."""
    if not isinstance(pattern, str):
        return f"expected a string, got {type(pattern).__name__}"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"the pattern has {len(pattern)} characters; at most {MAX_PATTERN_CHARS}"
    try:
        re.compile(pattern)
        parsed = _sre_parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"invalid regular expression: {exc}"
    open_repeats = 0
    for op, av, inside_repeat in _walk(parsed, False):
        if op in _REPEATS:
            low, high, body = av
            if high > 1 and inside_repeat:
                return ("a quantifier inside a repeated group (nested quantifiers backtrack exponentially); "
                        "write the repetition once, e.g. '.*' instead of '(.*)*'")
            if high > 16:  # bounded but long repeats ({0,1000}) cost like unbounded ones
                open_repeats += 1
        elif op == _BRANCH and inside_repeat:
            return "an alternation inside a repeated group (it can backtrack exponentially); repeat a character class"
    if open_repeats > MAX_OPEN_REPEATS:
        return (f"{open_repeats} unbounded quantifiers ('*', '+'); at most {MAX_OPEN_REPEATS} "
                "(each one multiplies the cost of a failed match)")
    return None


def check_regex(pattern: str, *, path: str = "", source: str | None = None) -> None:
    """Raise :class:`TargetError` naming ``path`` when :func:`regex_problem` refuses ``pattern``."""
    problem = regex_problem(pattern)
    if problem:
        raise TargetError(f"target regex {pattern!r}: {problem}", path=path, source=source)


def _sre_parse(pattern: str):
    try:
        from re import _parser  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse as _parser
    return _parser.parse(pattern)


def _sre_constants():
    try:
        from re import _constants as c
    except ImportError:  # pragma: no cover
        import sre_constants as c
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT}
    if hasattr(c, "POSSESSIVE_REPEAT"):
        repeats.add(c.POSSESSIVE_REPEAT)
    return frozenset(repeats), c.BRANCH, c.SUBPATTERN, c.MAXREPEAT, c


_REPEATS, _BRANCH, _SUBPATTERN, _MAXREPEAT, _C = _sre_constants()


def _walk(parsed, inside_repeat: bool):
    """(opcode, argument, inside a repeat with max > 1) for every node of a parsed pattern."""
    for op, av in parsed:
        yield op, av, inside_repeat
        if op in _REPEATS:
            yield from _walk(av[2], inside_repeat or av[1] > 1)
        elif op == _BRANCH:
            for branch in av[1]:
                yield from _walk(branch, inside_repeat)
        elif op == _SUBPATTERN:
            yield from _walk(av[-1], inside_repeat)
        elif op in (_C.ASSERT, _C.ASSERT_NOT):
            yield from _walk(av[1], inside_repeat)
        elif op == getattr(_C, "ATOMIC_GROUP", None):
            yield from _walk(av, inside_repeat)
        elif op == _C.GROUPREF_EXISTS:
            for part in av[1:]:
                if part is not None:
                    yield from _walk(part, inside_repeat)


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return _suffix_match(name, target) or type(module).__name__ == target


def _output_layers(model: nn.Module) -> set[int]:
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        out.add(id(head))
    for name, module in model.named_modules():
        if name.split(".")[-1] in HEAD_NAMES or name.startswith(tuple(h + "." for h in ("classifier", "score"))):
            out.add(id(module))
    return out


def match_targets(model: nn.Module, targets: tuple[str, ...], *, path: str, source: str | None = None,
                  exclude: set[str] = frozenset()) -> list[str]:
    """Names of the modules matched by ``targets``, in model order.

    Every target must match at least one module, otherwise :class:`TargetError` names the
    target and the closest module names. ``exclude`` holds names that are never matched
    (modules already wrapped by an earlier adapter keep their inner names out).
    """
    from . import layers

    for target in targets:
        if target.startswith("re:"):
            check_regex(target[3:], path=path, source=source)
    named = [(n, m) for n, m in model.named_modules() if n and n not in exclude and ".base_layer" not in n
             and not n.endswith("base_layer")]
    chosen: list[str] = []
    heads = _output_layers(model) if ALL_LINEAR in targets else set()
    for target in targets:
        if target == ALL_LINEAR:
            hits = [n for n, m in named if layers.layer_kind(m) in ("linear", "conv1d") and id(m) not in heads
                    and not _inside_adapter(n)]
        else:
            hits = [n for n, m in named if _matches(n, m, target) and not _inside_adapter(n)]
        if not hits:
            raise TargetError(f"target {target!r} matches no module in {type(model).__name__}; "
                              f"close names: {', '.join(_close(target, [n for n, _ in named])) or 'none'}",
                              path=path, source=source)
        chosen += [h for h in hits if h not in chosen]
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(chosen, key=order.__getitem__)


def _inside_adapter(name: str) -> bool:
    """Modules that adapters themselves added (lora_A, adapter_down...) are never targets."""
    parts = name.split(".")
    return any(p.startswith(("lora_", "lorma_", "lmam_", "adapter_", "modapt_")) for p in parts)


def _close(target: str, names: list[str]) -> list[str]:
    key = target[3:] if target.startswith("re:") else target
    leaves = sorted({n.split(".")[-1] for n in names})
    close = difflib.get_close_matches(key, leaves, n=5, cutoff=0.5)
    return close or leaves[:8]
