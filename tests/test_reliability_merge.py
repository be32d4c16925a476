"""Merges never destroy their inputs or the previous output, whatever moment they are killed at.

Fault injection is deterministic: ``modapt_export.merge.FAULT_HOOK`` is called with the name of
every rename / file-replacement boundary; a forked child merges and SIGKILLs itself at one
boundary (no cleanup runs, as with a real kill). After each kill the output folder must be the
previous output or the new one, byte for byte, never a mix; the next merge into the same folder
must remove what the killed one left (hidden ``.partial`` and ``.old-PID`` folders).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import modapt
import modapt.cli
import modapt.lora
import pytest
import torch
from modapt.testing import tiny_llama

pytest.importorskip("modapt_export")
import modapt_export.plugin  # noqa: E402
from modapt_export import MergeError, merge  # noqa: E402
from modapt_export import merge_checkpoint  # noqa: E402

RECIPE = {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}]}


@pytest.fixture
def root(tmp_path, modapt_registry):
    """base/ (sharded), adapters a/ and b/ (different values), references ref_a/ and ref_b/."""
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    modapt_registry.register_plugin(modapt_export.plugin, "export", "modapt-export")
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="60KB")
    for name, value in (("a", 0.01), ("b", 0.02)):
        model = modapt.apply(tiny_llama(), RECIPE)
        with torch.no_grad():
            for p in modapt.trainable_parameters(model).values():
                p.fill_(value)
        modapt.save(model, tmp_path / name)
        merge_checkpoint(tmp_path / "base", tmp_path / name, tmp_path / f"ref_{name}")
    return tmp_path


def content(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".out."))


def killed_at(point: str, fn) -> bool:
    """Run ``fn`` in a forked child that SIGKILLs itself at boundary ``point``; True when it was killed there."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            def hook(p):
                if p == point:
                    os.kill(os.getpid(), signal.SIGKILL)
            merge.FAULT_HOOK = hook
            fn()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def boundaries(fn) -> list[str]:
    seen: list[str] = []
    merge.FAULT_HOOK = seen.append
    try:
        fn()
    finally:
        merge.FAULT_HOOK = None
    return seen


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_merge_killed_at_every_boundary_keeps_the_old_or_the_new_output(root, monkeypatch, exchange):
    if not exchange:  # a filesystem without renameat2(RENAME_EXCHANGE): the fallback commit
        monkeypatch.setattr(merge, "_exchange", lambda a, b: False)
    old, new = content(root / "ref_a"), content(root / "ref_b")
    assert old != new
    out = root / "out"

    def overwrite():
        merge_checkpoint(root / "base", root / "b", out, overwrite=True)

    merge_checkpoint(root / "base", root / "a", out)
    points = boundaries(overwrite)
    assert sum(p.startswith("shard:") for p in points) >= 2
    assert ("exchanged" in points) == exchange and ("moved-aside" in points) != exchange
    for point in points:
        merge_checkpoint(root / "base", root / "a", out, overwrite=True)  # the previous output
        assert killed_at(point, overwrite), point
        if point == "moved-aside":  # killed between the two renames: the old output waits aside, whole
            assert not out.exists() and [content(p) for p in root.glob(".out.old-*")] == [old]
            merge.clean_stale(out)
        now = content(out)
        assert now in (old, new), f"killed at {point}: a mix of the old and the new output"
        assert now == (new if point in ("exchanged", "renamed") else old), point
        overwrite()  # the next run completes the job and removes what the kill left
        assert content(out) == new and hidden(root) == [], (point, hidden(root))
    print(f"\nmerge with overwrite ({'exchange' if exchange else 'two renames'}): killed at {len(points)} boundaries")


def test_first_merge_killed_at_every_boundary_leaves_no_output(root):
    out = root / "out"

    def first():
        merge_checkpoint(root / "base", root / "b", out)

    points = boundaries(first)
    new = content(out)
    for point in points:
        merge.clean_stale(out)
        if out.exists():
            merge._remove(out)
        assert killed_at(point, first)
        assert not out.exists() or content(out) == new, point
        assert (point == "renamed") == out.exists()
        merge._remove(out)
        first()
        assert content(out) == new and hidden(root) == []
    print(f"\nfirst merge: killed at {len(points)} boundaries")


def test_a_live_merges_partial_folder_is_left_alone(root):
    """Only leftovers whose process is dead are removed: a concurrent merge keeps its work."""
    live = root / f".out.{os.getppid()}.abc.partial"
    dead_pid = _dead_pid()
    dead = root / f".out.{dead_pid}.xyz.partial"
    aside = root / f".out.old-{dead_pid}"
    other = root / f".other.{dead_pid}.q.partial"
    for folder in (live, dead, aside, other):
        folder.mkdir()
    (root / "out").mkdir()
    assert sorted(merge.clean_stale(root / "out")) == sorted([dead.name, aside.name])
    assert live.exists() and other.exists() and not dead.exists() and not aside.exists()


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


@pytest.mark.parametrize("where", ["root", "base", "adapter", "inside-base", "inside-adapter", "link-to-root"])
def test_overwrite_never_targets_an_input(root, where, capsys):
    """`--out` = a folder holding the inputs, an input itself, or a folder inside one: refused, nothing touched."""
    work = root / "work"
    work.mkdir()
    (work / "base").symlink_to(root / "base")
    import shutil

    shutil.copytree(root / "a", work / "adapter")
    (work / "notes.txt").write_text("unrelated")
    out = {"root": work, "base": work / "base", "adapter": work / "adapter", "inside-base": root / "base" / "m",
           "inside-adapter": work / "adapter" / "m", "link-to-root": root / "link"}[where]
    if where == "link-to-root":
        out.symlink_to(work)
    before = {p: p.read_bytes() for p in list(work.rglob("*")) + list((root / "base").iterdir()) if p.is_file()}
    code = modapt.cli.main(["merge", "--base", str(work / "base"), "--adapter", str(work / "adapter"),
                            "--out", str(out), "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "never writes over its inputs" in err and str(out) in err
    assert {p: p.read_bytes() for p in before} == before
    assert not any(p.name.endswith(".partial") for p in root.rglob("*"))


def test_safe_merge_checks_modules_to_save(root, modapt_registry):
    model = modapt.apply(tiny_llama(), {**RECIPE, "modules_to_save": ["lm_head"]})
    with torch.no_grad():
        model.lm_head.weight[3, 1] = float("inf")
    modapt.save(model, root / "inf_head")
    with pytest.raises(MergeError, match="modules_to_save tensor 'lm_head.weight' holds NaN or Inf"):
        merge_checkpoint(root / "base", root / "inf_head", root / "out")
    assert not (root / "out").exists() and hidden(root) == []
    merge_checkpoint(root / "base", root / "inf_head", root / "out", safe=False)  # the explicit opt-out


def test_symlinked_side_files_are_copied_as_links(root):
    secret = root / "secret.txt"
    secret.write_text("private key")
    (root / "base" / "notes.md").symlink_to(secret)
    merge_checkpoint(root / "base", root / "a", root / "out")
    copied = root / "out" / "notes.md"
    assert copied.is_symlink() and os.readlink(copied) == str(secret.resolve())
    # the output holds no byte of the linked file: only the link itself
    assert all(not p.is_file() or p.is_symlink() or b"private key" not in p.read_bytes()
               for p in (root / "out").iterdir())


def _edit_json(path: Path, edit) -> None:
    import json

    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_evil_regex_in_a_saved_recipe_is_refused_not_run(root, capsys):
    """A downloaded adapter whose saved targets backtrack for ever: refused before any match."""
    import shutil

    shutil.copytree(root / "a", root / "evil")
    _edit_json(root / "evil" / "adapter_config.json",
               lambda c: c["recipe"]["adapter"][0].update(targets=["re:(.*.*.*.*.*)*X"]))
    with pytest.raises(modapt.ModaptError, match="nested quantifiers"):
        modapt.load(tiny_llama(), root / "evil")
    code = modapt.cli.main(["merge", "--base", str(root / "base"), "--adapter", str(root / "evil"),
                            "--out", str(root / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "nested quantifiers" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("key, words", [("((", "invalid regular expression"),
                                        ("(.*.*.*.*.*)*X", "nested quantifiers")])
def test_peft_rank_pattern_key_that_is_no_safe_regex_is_one_line(root, capsys, key, words):
    from modapt_export import save_peft

    model = modapt.apply(tiny_llama(), RECIPE)
    save_peft(model, root / "peft")
    _edit_json(root / "peft" / "adapter_config.json", lambda c: c.update(rank_pattern={key: 2}))
    code = modapt.cli.main(["merge", "--base", str(root / "base"), "--adapter", str(root / "peft"),
                            "--out", str(root / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and f"PEFT pattern key {key!r}" in err and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "re.error" not in err


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(base_fingerprint={}), "records no base fingerprint"),
    (lambda c: c["base_fingerprint"]["tensors"].update({next(iter(c["base_fingerprint"]["tensors"])): 5}),
     "malformed base fingerprint entry"),
], ids=["empty", "entry-an-int"])
def test_an_unknown_base_fingerprint_is_refused_unless_no_verify_base(root, capsys, edit, words):
    """As modapt.load: {} or malformed entries mean the base is unknown (the trial merged {} with exit 0
    and crashed on an int entry with a TypeError)."""
    import shutil

    shutil.copytree(root / "a", root / "fp")
    _edit_json(root / "fp" / "adapter_config.json", edit)
    args = ["merge", "--base", str(root / "base"), "--adapter", str(root / "fp"), "--out", str(root / "out"), "--quiet"]
    code = modapt.cli.main(args)
    err = capsys.readouterr().err
    assert code == 1 and words in err and "--no-verify-base" in err and str(root / "fp") in err, err
    assert len(err.strip().splitlines()) == 1 and not (root / "out").exists() and hidden(root) == []
    assert modapt.cli.main([*args, "--no-verify-base"]) == 0  # the explicit opt-out merges
    assert content(root / "out") == content(root / "ref_a")


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_hostile_base_config_json_is_one_line(root, capsys, command):
    """config.json nested 100 000 deep (json.loads: RecursionError) is refused by the bounded reader,
    naming the file, before transformers parses it."""
    config = root / "base" / "config.json"
    config.write_text(config.read_text()[:-2] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    args = (["merge", "--base", str(root / "base"), "--adapter", str(root / "a"), "--out", str(root / "out"), "--quiet"]
            if command == "merge" else
            ["export", "onnx", "--base", str(root / "base"), "--out", str(root / "out"), "--task", "causal-lm", "--quiet"])
    code = modapt.cli.main(args)
    err = capsys.readouterr().err
    assert code == 1 and f"{config}: JSON nested deeper than 64 levels" in err, err
    assert len(err.strip().splitlines()) == 1 and not (root / "out").exists()


def test_export_onnx_never_loads_a_pickle_checkpoint(root, capsys, monkeypatch):
    """A base with only pytorch_model.bin: transformers would unpickle it; refused as the merge refuses it."""
    import pickle

    for shard in (root / "base").glob("model*"):
        shard.unlink()
    torch.save({"w": torch.zeros(2)}, root / "base" / "pytorch_model.bin")

    def never(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    code = modapt.cli.main(["export", "onnx", "--base", str(root / "base"), "--out", str(root / "out"),
                            "--task", "causal-lm", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "pytorch_model.bin found: pickle checkpoints are not read" in err, err
    assert len(err.strip().splitlines()) == 1 and not (root / "out").exists()
