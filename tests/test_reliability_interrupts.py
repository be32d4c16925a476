"""Interrupted writes: a writer killed with SIGKILL at a random moment never leaves output that loads wrong.

``modapt.save`` writes a whole new folder beside the old one and swaps them in one step
(``modapt.atomic_folder``); ``merge_checkpoint`` writes a temporary folder renamed into place;
``modapt train`` writes ``best/`` and ``last/`` through ``modapt.save``. Each test runs the
writer in a subprocess, kills it (SIGKILL: no cleanup runs) a few times at random moments and
checks what is on disk: the previous or the new complete adapter, which must load; a folder
that does not load fails the test. (core/tests/test_save_faults.py kills save at every rename,
deterministically; core/tests/test_train_faults.py kills ``modapt train`` at every rename of its
``best/`` and ``last/`` replacements and at the final evaluation, and sends it SIGINT at each
step and save.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import modapt
import pytest
import torch
from modapt.persistence import read_config, read_tensors
from modapt.testing import tiny_llama

# (kills, marks): two kills in `make test` (each costs a Python + torch start), more under -m slow
KILLS = [pytest.param(2, id="2-kills"), pytest.param(6, id="6-kills", marks=pytest.mark.slow)]
RECIPE = {"adapter": [{"method": "lora", "r": 32, "targets": "all-linear"}], "modules_to_save": ["lm_head"]}


@pytest.fixture(autouse=True)
def registry(modapt_registry):
    import modapt.lora

    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    return modapt_registry


def run_and_kill(script: str, ready_path: Path, rng: random.Random, *, wait=(0.05, 1.5), env=None) -> None:
    """Start ``script``; once it has created ``ready_path``, wait a random moment and SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 240
        while not ready_path.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the writer never got ready"
            time.sleep(0.05)
        time.sleep(rng.uniform(*wait))
        assert proc.poll() is None, "the writer finished before it was killed: " + proc.stderr.read().decode()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def loads_consistently(directory: Path, *, allow_refusal: bool = False) -> str:
    """'v<k>' when the adapter loads and every tensor holds the one value k. A folder that does not
    load fails the test (saves swap whole folders: the previous save must survive any kill), except
    under ``allow_refusal`` (``modapt train``'s checkpoints: the train CLI's own test), where the
    sha256 refusal is reported as 'refused'."""
    model = tiny_llama()
    try:
        modapt.load(model, directory)
    except modapt.AdapterLoadError as exc:
        if not allow_refusal:
            raise AssertionError(f"the folder does not load after a kill: {exc}") from None
        assert "does not match the sha256" in str(exc) or "no adapter_config.json" in str(exc), str(exc)
        assert not modapt.is_adapted(model)
        return "refused"
    values = {float(v.detach().flatten()[0]) for v in modapt.adapter_state_dict(model).values()}
    assert len(values) == 1, f"a mix of saves was loaded: {values}"
    for v in modapt.adapter_state_dict(model).values():
        assert torch.all(v == next(iter(values)))
    return f"v{values.pop():g}"


SAVE_LOOP = """
import sys, torch, modapt
from pathlib import Path
from modapt.testing import tiny_llama
out, ready = Path(sys.argv[1] if len(sys.argv) > 1 else {out!r}), Path({ready!r})
model = modapt.apply(tiny_llama(), {recipe!r})
params = list(modapt.trainable_parameters(model).values())
k = 1
while True:
    with torch.no_grad():
        for p in params:
            p.fill_(k)
    modapt.save(model, out)
    ready.touch()
    k += 1
"""


@pytest.mark.parametrize("kills", KILLS)
def test_killed_save_leaves_the_previous_or_the_new_adapter(tmp_path, kills):
    rng = random.Random(26)
    out = tmp_path / "adapter"
    model = modapt.apply(tiny_llama(), RECIPE)
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.fill_(0.5)
    modapt.save(model, out)
    outcomes = []
    for i in range(kills):
        ready = tmp_path / f"ready{i}"
        run_and_kill(SAVE_LOOP.format(out=str(out), ready=str(ready), recipe=RECIPE), ready, rng)
        outcomes.append(loads_consistently(out))
        # the folder holds one save's files; a killed saver's copy is a hidden sibling, never inside
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "modapt_adapter.safetensors"]
        assert all(p.name.startswith(".adapter.") for p in tmp_path.iterdir() if p.name.startswith(".adapter"))
    print("save kill outcomes:", outcomes)


@pytest.mark.slow
def test_killed_first_save_leaves_nothing_loadable(tmp_path):
    """A fresh folder killed mid-save: either absent or complete."""
    rng = random.Random(7)
    for i in range(2):
        out = tmp_path / f"fresh{i}"
        ready = tmp_path / f"ready{i}"
        script = SAVE_LOOP.format(out=str(out), ready=str(ready), recipe=RECIPE).replace(
            "    modapt.save(model, out)\n    ready.touch()", "    ready.touch()\n    modapt.save(model, out)")
        run_and_kill(script, ready, rng, wait=(0.0, 0.05))
        if out.exists():
            loads_consistently(out)


MERGE_LOOP = """
import os, sys, modapt, modapt.lora
from pathlib import Path
from modapt_export import merge_checkpoint
root, ready = Path({root!r}), Path({ready!r})
i = 0
while True:
    merge_checkpoint(root / "base", root / "adapter", root / "out", overwrite=True)
    merge_checkpoint(root / "base", root / "adapter", root / f"new{{os.getpid()}}_{{i}}")
    ready.touch()
    i += 1
"""


@pytest.mark.parametrize("kills", KILLS)
def test_killed_merge_never_leaves_a_partial_checkpoint(tmp_path, kills):
    pytest.importorskip("modapt_export")
    from modapt_export import merge_checkpoint

    rng = random.Random(3)
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="60KB")
    model = modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}]})
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.fill_(0.01)
    modapt.save(model, tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "ref")
    reference = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}

    def complete(folder: Path) -> bool:
        return {p.name: p.read_bytes() for p in folder.iterdir()} == reference

    for i in range(kills):
        ready = tmp_path / f"ready{i}"
        run_and_kill(MERGE_LOOP.format(root=str(tmp_path), ready=str(ready)), ready, rng, wait=(0.0, 1.0))
        for folder in tmp_path.iterdir():
            if folder.name == "out" or folder.name.startswith("new"):
                assert complete(folder), f"{folder.name} is a half-written checkpoint"
        # the overwritten output is either in place or, killed between the two renames, moved aside whole
        if not (tmp_path / "out").exists():
            aside = list(tmp_path.glob(".out.old-*"))
            assert aside and complete(aside[0]), "the previous merged checkpoint was lost"
        for partial in tmp_path.glob(".*.partial"):
            assert not partial.name.startswith(("out", "new"))  # hidden, never under the output's name


def _train_workdir(root: Path) -> None:
    from modapt.testing.models import tiny_model_dir, write_sentiment_csv

    tiny_model_dir(root / "model")
    write_sentiment_csv(root / "data.csv")
    (root / "recipe.toml").write_text(
        'modules_to_save = ["score"]\n\n[[adapter]]\nmethod = "lora"\nr = 4\ntargets = ["q_proj", "v_proj"]\n')


@pytest.mark.slow
def test_killed_training_leaves_checkpoints_that_load_or_are_refused(tmp_path):
    """``modapt train`` killed while it evaluates and saves ``best/`` every step."""
    rng = random.Random(11)
    _train_workdir(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        from modapt.cli import main
        sys.exit(main(["train", "--recipe", {str(tmp_path / 'recipe.toml')!r}, "--model", {str(tmp_path / 'model')!r},
                       "--data", {str(tmp_path / 'data.csv')!r}, "--label-column", "sentiment",
                       "--out", {str(tmp_path / 'run')!r}, "--steps", "2000", "--eval-every", "1",
                       "--batch-size", "4", "--lr", "0.01", "--no-progress", "--overwrite"]))
    """)
    for i in range(2):
        run_and_kill(script, tmp_path / "run" / "best" / "adapter_config.json", rng, wait=(0.2, 2.0))
        for name in ("best", "last"):
            folder = tmp_path / "run" / name
            if not folder.exists():
                continue
            config = read_config(folder)  # modapt.save swaps whole folders: an unloadable one fails here
            tensors = read_tensors(folder, config)
            assert len(tensors) == config["weights"]["count"] and tensors
            assert all(torch.isfinite(t).all() for t in tensors.values())
