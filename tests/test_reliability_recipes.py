"""Recipes from users: every input ends in a valid recipe or a modapt error naming the key path.

Property-based: hypothesis mutates valid recipes of every installed method (wrong types,
unknown keys, missing fields, negative/zero/huge numbers, rank > dimension, targets that match
nothing, incompatible compositions, unknown or cyclic presets) and checks that
``parse_recipe`` returns a Recipe or raises a :class:`modapt.ModaptError` (a RecipeError with
its key path in the message), that ``apply`` of a parsed recipe either adapts the model or
raises a ModaptError leaving the model untouched, and that ``modapt recipe check`` prints the
error without a traceback and exits 1. The number of generated cases is printed at the end of
the session (``reliability fuzz: N cases``). ``-m slow`` runs a larger profile.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import modapt
import modapt.cli
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modapt.recipe import MAX_RECIPE_BYTES, parse_recipe
from modapt.registry import Registry, use_registry
from modapt.testing import tiny_llama

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SLOW = settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
FAST_APPLY = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SLOW_APPLY = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))

CASES: Counter = Counter()
TARGETS = ["q_proj", "v_proj"]


def _bases() -> list[dict]:
    """One valid recipe per installed method (an explicit update, preset-free)."""
    out = [{"adapter": [{"method": "lora", "r": 4, "targets": TARGETS}], "modules_to_save": ["lm_head"]}]
    # every installed method's own example (Method.example): no list of method names here
    installed = modapt.registry.default_registry().methods
    for name, method in sorted(installed.items()):
        entry = method.example
        if name != "lora" and entry is not None and (entry.get("update") is None or entry["update"]["method"] in installed):
            out.append({"adapter": [copy.deepcopy(entry)]})
    out.append({"adapter": [{"method": "lora", "r": 2, "targets": ["q_proj"]},
                            {"method": "lora", "r": 2, "targets": ["k_proj"]}]})
    out.append({"preset": "pair", "overrides": {"lora": {"r": 2}}})
    out.append({"preset": "self"})  # a self-referencing preset: must be an error, never a hang
    out.append({"preset": "ping"})  # ping -> pong -> ping
    return out


@pytest.fixture(scope="module")
def registry():
    """Every installed plugin plus a test plugin with presets, including cyclic ones."""
    import types

    presets = types.SimpleNamespace()

    @modapt.hookimpl
    def modapt_register_presets(register):
        register("pair", {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj"]}]}, citation="test")
        register("self", {"preset": "self"}, citation="test")
        register("ping", {"preset": "pong"}, citation="test")
        register("pong", {"preset": "ping"}, citation="test")

    presets.modapt_register_presets = modapt_register_presets
    reg = Registry()
    reg.register_plugin(presets, name="test-presets", distribution="test-presets")
    reg.ensure_loaded()
    with use_registry(reg):
        yield reg


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    line = "reliability fuzz: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items())) + \
        f" (total {sum(CASES.values())} generated cases)"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # past pytest's output capture, like -s
            reporter.write_line("")
            reporter.write_line(line)
    else:  # pragma: no cover - terminal reporter disabled
        print(line)


# ---------------------------------------------------------------------------- strategies
junk = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
numbers = st.sampled_from([0, -1, -(2**31), 1, 2, 3, 63, 64, 65, 129, 10**4, 2**31, 2**63, 10**30,
                           0.0, -0.5, 0.5, 1e-30, 1e30, math.inf, -math.inf, math.nan, True, False])


def _paths(node, prefix=()):
    """Every (container, key) position in a nested recipe."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _parent(data, path):
    for p in path[:-1]:
        data = data[p]
    return data


@st.composite
def mutated(draw, max_mutations=3, gentle=False):
    """A valid recipe with 1..max_mutations mutations; ``gentle`` ones (numbers, targets, methods)
    often stay valid, so that ``apply`` sees ranks larger than the layer, odd targets and the like."""
    recipe = copy.deepcopy(draw(st.sampled_from(_bases())))
    kinds = ["number", "method", "targets"] if gentle else \
        ["delete", "junk", "number", "unknown_key", "method", "targets", "compose", "preset", "wrap"]
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = list(_paths(recipe))
        kind = draw(st.sampled_from(kinds))
        if gentle and kind == "number":
            paths = [p for p in paths if isinstance(_parent(recipe, p)[p[-1]], (int, float))] or paths
        if kind == "wrap":
            recipe = draw(st.sampled_from([[recipe], "adapter", None, 3, {"adapter": copy.deepcopy(recipe)}]))
            if not isinstance(recipe, dict):
                return recipe
            continue
        if not paths:
            recipe[draw(st.text(max_size=6))] = draw(junk)
            continue
        path = draw(st.sampled_from(paths))
        parent = _parent(recipe, path)
        key = path[-1]
        if kind == "delete":
            del parent[key]
        elif kind == "junk":
            parent[key] = draw(junk)
        elif kind == "number":
            parent[key] = draw(st.integers(1, 200) if gentle else numbers)
        elif kind == "unknown_key":
            target = parent[key] if isinstance(parent[key], dict) else (parent if isinstance(parent, dict) else None)
            if target is not None:
                target[draw(st.sampled_from(["rank", "lora_r", "alpha", "Targets", "metod", "", "r "]))] = 1
        elif kind == "method":
            parent[key] = draw(st.sampled_from(["lora", "map", "lmam", "dora", "bottleneck", "nope", "LoRA", "",
                                                "additive", "quanta"]))
        elif kind == "targets":
            parent[key] = copy.deepcopy(draw(st.sampled_from([["nothing_here"], [], "re:(", "re:.*", ["all-linear"], "all-linear",
                                                ["LlamaAttention"], ["lm_head"], ["embed_tokens"], [""], [1]])))
        elif kind == "compose":  # an update used as a reparam, a reparam inside a reparam, and so on
            parent[key] = copy.deepcopy(draw(st.sampled_from([  # a copy: the same dict twice could nest in itself
                {"method": "map", "targets": TARGETS, "update": {"method": "dora", "update": {"method": "lora"}}},
                {"method": "lora", "r": 2, "targets": TARGETS, "update": {"method": "lora"}},
                {"method": "map", "targets": TARGETS, "update": {"method": "lmam"}},
                {"method": "map", "targets": TARGETS, "update": {"method": "lora", "targets": TARGETS}},
                {"method": "lmam", "update": {"method": "lora"}},
                {"method": "map", "targets": TARGETS},
            ])))
        elif kind == "preset":
            recipe["preset"] = draw(st.sampled_from(["pair", "self", "ping", "nope", "pai", 3, None, ["pair"]]))
            if draw(st.booleans()):
                recipe["overrides"] = copy.deepcopy(draw(st.sampled_from(
                    [{"lora": {"r": -1}}, {"map": {}}, {"lora": 3}, [], {"lora": {"bogus": 1}}])))
    return recipe


def check_parse(recipe):
    """parse_recipe gives a Recipe or a ModaptError; a RecipeError names its key path."""
    try:
        return parse_recipe(recipe)
    except modapt.RecipeError as exc:
        msg = str(exc)
        assert msg.strip(), "empty message"
        # the key path, or for a whole-recipe problem the file (a string recipe is a path) or type
        named = (exc.path and exc.path in msg) or exc.source or "recipe is a mapping" in msg \
            or msg.startswith("unknown key ''")
        assert named, f"no key path in: {msg}"
        assert "Traceback" not in msg
        return None
    except modapt.ModaptError as exc:
        assert str(exc).strip()
        return None


def _small(node) -> bool:
    """Only moderate numbers reach ``apply`` (a rank of 2**63 is refused by the parser or would allocate)."""
    if isinstance(node, dict):
        return all(_small(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return all(_small(v) for v in node)
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return True
    return math.isfinite(node) and abs(node) <= 1024


def check_apply(parsed):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        modapt.apply(model, parsed)
    except modapt.ModaptError as exc:
        assert str(exc).strip()
        assert not modapt.is_adapted(model)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        return "refused"
    assert modapt.is_adapted(model)
    return "applied"


# ---------------------------------------------------------------------------- the properties
def _parse_property(recipe):
    CASES["parse"] += 1
    result = check_parse(recipe)
    CASES["parse_valid" if result is not None else "parse_refused"] += 1


@FAST
@given(recipe=mutated())
def test_mutated_recipes_parse_or_raise_a_modapt_error(registry, recipe):
    _parse_property(recipe)


@pytest.mark.slow
@SLOW
@given(recipe=mutated(max_mutations=6))
def test_mutated_recipes_parse_or_raise_a_modapt_error_slow(registry, recipe):
    _parse_property(recipe)


def _apply_property(recipe):
    parsed = check_parse(recipe)
    if parsed is None or not _small(parsed.to_dict()):
        return
    CASES["apply"] += 1
    CASES["apply_" + check_apply(parsed)] += 1


@FAST_APPLY
@given(recipe=mutated(max_mutations=2, gentle=True))
def test_valid_mutants_apply_or_refuse_leaving_the_model_untouched(registry, recipe):
    _apply_property(recipe)


@pytest.mark.slow
@SLOW_APPLY
@given(recipe=mutated(max_mutations=3, gentle=True))
def test_valid_mutants_apply_or_refuse_leaving_the_model_untouched_slow(registry, recipe):
    _apply_property(recipe)


@pytest.mark.parametrize("method, key, value", [
    ("lora", "r", 4096), ("lora", "r", 65), ("flora", "r", 4096), ("lorma", "r", 4096), ("adalora", "init_r", 4096),
])
def test_rank_larger_than_the_layer_is_refused_at_apply(registry, method, key, value):
    """A rank the recipe allows but the layer (64 wide) cannot hold: a ModaptError, model untouched."""
    if method not in registry.methods:
        pytest.skip(f"{method} is not installed")
    entry = {"method": method, key: value, "targets": TARGETS}
    if method == "adalora":
        entry.update(target_r=2, total_step=10)
    parsed = check_parse({"adapter": [entry]})
    assert parsed is not None
    assert check_apply(parsed) == "refused"


@FAST
@given(recipe=mutated())
def test_cli_prints_errors_without_traceback(registry, recipe, tmp_path_factory, capsys):
    CASES["cli"] += 1
    path = tmp_path_factory.mktemp("cli") / "recipe.json"
    try:
        path.write_text(json.dumps(recipe, allow_nan=True))
    except (TypeError, ValueError):  # not JSON-representable (never happens with these strategies)
        return
    code = modapt.cli.main(["recipe", "check", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 1), (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 1:
        assert err.startswith("modapt: error: ") and str(path) in err
    else:
        assert "valid" in out


BAD_FILES = {
    "non_utf8.toml": (b"[[adapter]]\nmethod = \"lora\xff\xfe\"\n", "not UTF-8"),
    "latin1.json": ("{\"adapter\": [{\"method\": \"lorà\"}]}".encode("latin-1"), "not UTF-8"),
    "huge.json": (b"{\"adapter\": [" + b" " * (MAX_RECIPE_BYTES + 1) + b"]}", "a recipe is at most"),
    "bad.toml": (b"[[adapter]\nmethod = 'lora'", "cannot parse TOML"),
    "bad.json": (b"{\"adapter\": [", "cannot parse JSON"),
    "bad.yaml": (b"adapter: [\n  - method: lora\n  - {", "cannot parse YAML"),
    "list.json": (b"[1, 2]", "table/object at the top level"),
    "recipe.txt": (b"adapter = []", "unknown recipe format"),
    "empty.toml": (b"", "no adapters"),
    "self.json": (b"{\"preset\": \"self\"}", "preset cycle: self -> self"),
    "ping.json": (b"{\"preset\": \"ping\"}", "preset cycle: ping -> pong -> ping"),
    "unknown_preset.json": (b"{\"preset\": \"pairr\"}", "did you mean 'pair'"),
    "nothing.json": (b"{\"adapter\": [{\"method\": \"lora\", \"r\": 0, \"targets\": [\"q_proj\"]}]}",
                     "adapter[0].r"),
    "deep.json": (b"[" * 100000 + b"]" * 100000, "cannot parse JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_cli_bad_files_exit_1_with_a_message(registry, tmp_path, capsys, name):
    data, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    code = modapt.cli.main(["recipe", "check", str(path)])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "Traceback" not in err and message in err, err
    assert err.startswith(f"modapt: error: {path}: ")


def test_targets_matching_nothing_name_the_entry(registry):
    parsed = parse_recipe({"adapter": [{"method": "lora", "r": 2, "targets": ["q_porj"]}]})
    model = tiny_llama()
    with pytest.raises(modapt.TargetError, match=r"adapter\[0\].*q_porj.*did you mean|q_porj"):
        modapt.apply(model, parsed)
    assert not modapt.is_adapted(model)


def test_yaml_alias_bomb_gives_a_short_error(registry, tmp_path, capsys):
    """500 bytes of nested YAML aliases expand to 9^9 strings: the error quotes a bounded excerpt
    (before the fix its repr ran out of memory: see the commit bounding values in recipe errors)."""
    text = 'adapter:\n  - method: lora\n    r: 2\n    targets: ["q_proj"]\n  - method: lora\n    targets:\n'
    text += '      - &a ["x","x","x","x","x","x","x","x","x"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"      - &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    text += "modules_to_save: *i\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert len(text) < 1000
    code = modapt.cli.main(["recipe", "check", str(path)])
    _, err = capsys.readouterr()
    assert code == 1 and "modules_to_save: expected a list of non-empty strings" in err
    assert len(err) < 2000, len(err)
