"""ONNX Runtime GenAI folders and adapters as graph inputs (issue 37).

Each export takes ~10 s on 2 cores: one module-scoped fixture per graph, reused by the tests.
The GenAI side runs in a subprocess that never imports modapt (what a deployment has): the
folder as written must be enough. References are transformers' ``generate(do_sample=False)``
and forward on the PyTorch model with each adapter loaded.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import modapt
from modapt.testing.models import tiny_llama

pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")

from modapt_export import adapter_inputs  # noqa: E402
from modapt_export.onnx_export import export_onnx_pretrained  # noqa: E402
from modapt_export.progress import Progress  # noqa: E402

LORA = {"adapter": [{"method": "lora", "targets": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8}]}
PROMPTS = [[5, 17, 99, 3], [44, 2, 71, 8, 120, 9, 33, 61, 12, 7, 90]]  # two lengths
NEW_TOKENS = 8

GENAI_SCRIPT = textwrap.dedent("""
    import json, sys
    import onnxruntime_genai as og
    folder, prompts, new, adapter_files = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    model = og.Model(folder)
    adapters = None
    if adapter_files:
        adapters = og.Adapters(model)
        for name, path in adapter_files.items():
            adapters.load(path, name)
    out = {}
    for active in [None, *adapter_files]:
        rows = []
        for prompt in prompts:
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=len(prompt) + new)
            gen = og.Generator(model, params)
            if active is not None:
                gen.set_active_adapter(adapters, active)
            gen.append_tokens([prompt])
            while not gen.is_done():
                gen.generate_next_token()
            rows.append([int(t) for t in gen.get_sequence(0)])
        out[active or ""] = rows
    assert not any(m == "modapt" or m.startswith("modapt_") for m in sys.modules), "modapt was imported"
    print(json.dumps(out))
""")


def _genai_tokens(folder, adapter_files=None) -> dict:
    """GenAI's greedy tokens per active adapter ('' = none) and prompt, from a fresh interpreter."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", GENAI_SCRIPT, str(folder), json.dumps(PROMPTS), str(NEW_TOKENS),
                           json.dumps({k: str(v) for k, v in (adapter_files or {}).items()})],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_tokens(model) -> list[list[int]]:
    rows = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS)
        rows.append(out[0].tolist())
    return rows


def _randomise(model, seed: int, std: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (p if p.dim() <= 1 else 0))
    return model


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _peft_lora(tmp):
    """A base checkpoint and a PEFT LoRA folder made by PEFT itself (B randomised); returns
    (base dir, adapter dir, the PEFT model: the reference)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama("causal-lm", seed=0)
    base.save_pretrained(tmp / "base")
    peft_model = get_peft_model(tiny_llama("causal-lm", seed=0),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(tmp / "peft")
    return tmp / "base", tmp / "peft", peft_model.eval()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """``modapt export onnx --adapter PEFT_FOLDER`` (merged graph), as the CLI calls it; every
    transformers log line and warning of the export recorded."""
    from transformers.utils import logging as hf_logging

    tmp = tmp_path_factory.mktemp("genai")
    base, adapter, model = _peft_lora(tmp)
    hf_logging.get_logger("x").warning_once.__func__.cache_clear()  # warnings already given are given again
    handler = _Records()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with _no_filter() as caught:
            manifest = export_onnx_pretrained(base, tmp / "plain", "causal-lm", adapter=adapter)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    return model, tmp / "plain", manifest, handler.messages + [str(w.message) for w in caught]


def _no_filter():
    import warnings

    class _Catch(warnings.catch_warnings):
        def __enter__(self):
            got = super().__enter__()
            warnings.simplefilter("always")
            return got

    return _Catch(record=True)


def test_genai_folder_generates_like_transformers(plain):
    model, out, manifest, _ = plain
    assert manifest["adapters"][0]["method"] == "lora"  # the PEFT folder was read
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == "model.onnx"
    assert (cfg["model"]["decoder"]["num_key_value_heads"], cfg["model"]["decoder"]["head_size"]) == (2, 16)
    assert cfg["search"]["past_present_share_buffer"] is False
    assert manifest["genai_check"]["passed"] is True  # the export's own self-check ran
    got = _genai_tokens(out)[""]
    want = _torch_tokens(model)
    assert got == want
    ids = torch.tensor([PROMPTS[1]])
    np.testing.assert_allclose(_ort_prefill(out, ids), _prefill_logits(model, ids), atol=1e-4, rtol=0)
    with model.disable_adapter():  # the PEFT adapter is in the graph: not the base
        assert np.abs(_ort_prefill(out, ids) - _prefill_logits(model, ids)).max() > 1e-2
    assert [len(r) for r in got] == [len(p) + NEW_TOKENS for p in PROMPTS]


def test_export_gives_no_past_key_values_deprecation(plain):
    messages = plain[3]
    assert not [m for m in messages if "deprecated" in m and ("past_key_values" in m or "cache" in m)], messages


def test_cuda_folder_configures_the_cuda_provider():
    from modapt_export.genai_config import genai_config

    model = tiny_llama("causal-lm")
    cpu = genai_config(model.config, model.generation_config, device="cpu")
    cuda = genai_config(model.config, model.generation_config, device="cuda:0")
    assert cpu["model"]["decoder"]["session_options"]["provider_options"] == []
    assert cuda["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


# --- adapters as inputs ----------------------------------------------------------------------------


def _save_adapters(tmp, recipe, seeds=(11, 12)):
    """A base checkpoint and adapters A, B of ``recipe`` trained to random values; returns
    (base dir, [A dir, B dir], [torch base, torch A, torch B])."""
    base = tiny_llama("causal-lm", seed=0)
    base.save_pretrained(tmp / "base")
    dirs, models = [], [base]
    for name, seed in zip("AB", seeds):
        m = _randomise(modapt.apply(tiny_llama("causal-lm", seed=0), recipe), seed=seed)
        modapt.save(m, tmp / name)
        dirs.append(tmp / name)
        models.append(m)
    return tmp / "base", dirs, models


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory):
    """The CLI: ``modapt export onnx --adapters-as-inputs --adapter A --adapter B`` (stderr kept)."""
    from modapt.cli import main

    tmp = tmp_path_factory.mktemp("inputs")
    base, dirs, models = _save_adapters(tmp, LORA)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["export", "onnx", "--base", str(base), "--task", "causal-lm", "--out", str(tmp / "out"),
                     "--adapters-as-inputs", "--adapter", str(dirs[0]), "--adapter", str(dirs[1])])
    assert code == 0, err.getvalue()
    return tmp / "out", models, err.getvalue()


def _prefill_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()


def _ort_prefill(out, ids, adapter_file=None):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
             "position_ids": np.arange(ids.shape[1])[None].repeat(ids.shape[0], 0)}
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((ids.shape[0], 2, 0, 16), np.float32)
    options = None
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
    return sess.run(["logits"], feeds, options)[0]


def _check_prefill(out, models):
    ids = torch.tensor([PROMPTS[1], PROMPTS[1][::-1]])
    want = [_prefill_logits(m, ids) for m in models]
    got = [_ort_prefill(out, ids), _ort_prefill(out, ids, out / "adapters" / "A.onnx_adapter"),
           _ort_prefill(out, ids, out / "adapters" / "B.onnx_adapter")]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
    # the three references differ: equality above is not "the adapter was ignored"
    assert np.abs(want[0] - want[1]).max() > 1e-2 and np.abs(want[1] - want[2]).max() > 1e-2


def test_adapters_as_inputs_layout_and_progress(lora_inputs):
    import onnx

    out, _, stderr = lora_inputs
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["A.onnx_adapter", "B.onnx_adapter"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    inits = {i.name for i in graph.initializer}
    lora_inputs_ = {n for n in inputs if n.endswith(("lora_A.weight", "lora_B.weight"))}
    assert len(lora_inputs_) == 2 * 3 * 2  # 3 targets x 2 layers x (A, B)
    assert lora_inputs_ <= inits  # each has a default
    for stage in ("tracing", "optimisation", "saving", "verification"):
        assert f"{stage}" in stderr and "done in" in stderr


def test_adapters_as_inputs_ort_lora_adapter_matches_torch(lora_inputs):
    out, models, _ = lora_inputs
    _check_prefill(out, models)


def test_adapters_as_inputs_genai_switches_adapters(lora_inputs):
    out, models, _ = lora_inputs
    got = _genai_tokens(out, {"A": out / "adapters" / "A.onnx_adapter", "B": out / "adapters" / "B.onnx_adapter"})
    want = {"": _torch_tokens(models[0]), "A": _torch_tokens(models[1]), "B": _torch_tokens(models[2])}
    assert got == want
    assert want["A"] != want[""] and want["B"] != want["A"]


def _refusal(tmp_path, dirs, name, recipe) -> str:
    modapt.save(modapt.apply(tiny_llama("causal-lm", seed=0), recipe), tmp_path / name)
    with pytest.raises(adapter_inputs.AdapterSetError) as info:
        adapter_inputs.read_adapter_set(tiny_llama("causal-lm"), [dirs[0], tmp_path / name])
    return str(info.value)


def test_mismatched_rank_targets_or_scaling_refused(tmp_path):
    base, dirs, _ = _save_adapters(tmp_path, LORA)
    entry = LORA["adapter"][0]
    msg = _refusal(tmp_path, dirs, "R2", {"adapter": [{**entry, "r": 2}]})
    assert "'R2', layer 'model.layers.0.self_attn.q_proj'" in msg and "ranks must match" in msg
    msg = _refusal(tmp_path, dirs, "T", {"adapter": [{**entry, "targets": ["q_proj", "v_proj"]}]})
    assert "'T'" in msg and "layer 'model.layers.0.mlp.down_proj'" in msg
    msg = _refusal(tmp_path, dirs, "S", {"adapter": [{**entry, "lora_alpha": 16}]})
    assert "'S'" in msg and "lora_alpha" in msg
    with pytest.raises(modapt.ModaptError, match="need --adapters-as-inputs"):
        export_onnx_pretrained(base, tmp_path / "o", "causal-lm", adapter=[dirs[0], dirs[1]])


TARGETS = ["q_proj", "v_proj", "down_proj"]
FAMILY = {
    "rslora": {"method": "lora", "r": 4, "lora_alpha": 8, "use_rslora": True},
    "adalora": {"method": "adalora", "init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 100},
    "flora": {"method": "flora", "r": 4, "lora_alpha": 8},
    "lorma": {"method": "lorma", "r": 4, "lora_alpha": 4, "inflation": "plus"},
    "dora": {"method": "dora", "update": {"method": "lora", "r": 4, "lora_alpha": 8}},
    "map": {"method": "map", "init": "paper", "update": {"method": "lora", "r": 4, "lora_alpha": 8}},
}


def _inputs_export(tmp_path_factory, key: str):
    """Adapters A and B of one method exported as inputs; (out dir, [torch base, A, B], manifest)."""
    recipe = {"adapter": [{**FAMILY[key], "targets": TARGETS}]}
    tmp = tmp_path_factory.mktemp(key)
    try:
        base, dirs, models = _save_adapters(tmp, recipe)
    except modapt.RecipeError as exc:  # the plugin is not installed
        pytest.skip(f"{key}: {exc}")
    manifest = export_onnx_pretrained(base, tmp / "out", "causal-lm", adapter=dirs, adapters_as_inputs=True,
                                      progress=Progress(quiet=True))
    return tmp / "out", models, manifest


@pytest.fixture(scope="module", params=["rslora", "adalora", "flora"])
def family_inputs(request, tmp_path_factory):
    return _inputs_export(tmp_path_factory, request.param)


def test_lora_family_adapters_as_inputs(family_inputs):
    """ORT's LoraAdapter gives PyTorch's prefill logits for base, A and B; the export's own GenAI
    check generated each adapter's greedy tokens equal to generate's."""
    out, models, manifest = family_inputs
    _check_prefill(out, models)
    assert manifest["genai_check"]["passed"] and all(a["passed"] for a in manifest["genai_check"]["adapters"].values())


@pytest.fixture(scope="module")
def dora_inputs(tmp_path_factory):
    return _inputs_export(tmp_path_factory, "dora")[:2]


@pytest.fixture(scope="module")
def lomap_inputs(tmp_path_factory):
    return _inputs_export(tmp_path_factory, "map")[:2]


@pytest.fixture(scope="module")
def lorma_inputs(tmp_path_factory):
    return _inputs_export(tmp_path_factory, "lorma")[:2]


@pytest.mark.slow
def test_dora_adapters_as_inputs(dora_inputs):
    out, models = dora_inputs
    _check_prefill(out, models)
    got = _genai_tokens(out, {"A": out / "adapters" / "A.onnx_adapter"})
    assert got == {"": _torch_tokens(models[0]), "A": _torch_tokens(models[1])}


@pytest.mark.slow
def test_lomap_adapters_as_inputs(lomap_inputs):
    out, models = lomap_inputs
    _check_prefill(out, models)
    got = _genai_tokens(out, {"B": out / "adapters" / "B.onnx_adapter"})
    assert got == {"": _torch_tokens(models[0]), "B": _torch_tokens(models[2])}


@pytest.mark.slow
def test_lorma_plus_adapters_as_inputs(lorma_inputs):
    out, models = lorma_inputs
    _check_prefill(out, models)


def test_merge_reports_stages_and_quiet_silences(tmp_path, capsys):
    from modapt.cli import main

    base, adapter, _ = _peft_lora(tmp_path)
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m1")]) == 0
    err = capsys.readouterr().err
    assert "shard 1/1: model.safetensors (6 merged tensors)" in err and " s] " in err
    assert main(["merge", "--quiet", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m2")]) == 0
    err = capsys.readouterr().err
    assert "shard" not in err and " s] " not in err
