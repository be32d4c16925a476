"""Saves killed at every rename, two savers at once, full disks: the folder always loads whole.

Kills are deterministic: a forked child runs ``modapt.save`` with ``os.rename``, ``os.replace``
and the directory exchange wrapped so that it ``os._exit``s just before or just after its Nth
call (no cleanup runs, as with SIGKILL). The parent then loads the folder on a fresh model and
checks that every adapter tensor holds the one value of the old save or of the new one.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
from pathlib import Path

import pytest
import torch

import modapt
from modapt import atomic_folder, persistence
from modapt.atomic_folder import FolderBusyError, FolderWriteError
from modapt.testing import tiny_inputs, tiny_llama

RECIPE = {"adapter": [{"method": "lora", "r": 2, "targets": ["q_proj", "v_proj"]}], "modules_to_save": ["lm_head"]}
FIXTURE = Path(__file__).parent / "fixtures" / "format1_lora_r2"


@pytest.fixture(autouse=True)
def registry(modapt_registry):
    import modapt.lora

    modapt_registry.register_plugin(modapt.lora, name="lora", distribution="modapt")
    return modapt_registry


@pytest.fixture(scope="module")
def model():
    return modapt.apply(tiny_llama(), RECIPE)


def fill(model, value: float):
    with torch.no_grad():
        for p in modapt.trainable_parameters(model).values():
            p.fill_(value)
    return model


def loaded_value(directory: Path) -> float:
    """The one value every tensor of the loaded adapter holds (a mix fails the test)."""
    m = modapt.load(tiny_llama(), directory)
    values = {float(v) for t in modapt.adapter_state_dict(m).values() for v in t.detach().flatten().unique()}
    assert len(values) == 1, f"a mix of saves was loaded: {values}"
    return values.pop()


def save_in_child(model, directory: Path, kill_at: int | None, *, exchange_works: bool = True) -> int:
    """Fork; the child saves (killed at boundary event ``kill_at``); returns the child's exit status.

    Events are numbered 1, 2, ... as: before rename #1, after rename #1, before rename #2...
    Exit 0: the save ran to its end; 9: killed at the injection point.
    """
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            count = [0]

            def event():
                count[0] += 1
                if count[0] == kill_at:
                    os._exit(9)

            def wrap(fn):
                def wrapped(*a, **k):
                    event()
                    out = fn(*a, **k)
                    event()
                    return out
                return wrapped

            os.rename, os.replace = wrap(os.rename), wrap(os.replace)
            atomic_folder.exchange = wrap(atomic_folder.exchange if exchange_works else (lambda a, b: False))
            modapt.save(model, directory)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent through the code
            print(f"child failed: {type(exc).__name__}: {exc}", flush=True)
            code = 3 if isinstance(exc, FolderBusyError) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("exchange_works", [True, False], ids=["renameat2-exchange", "two-renames-journal"])
def test_a_save_killed_at_every_rename_leaves_the_old_or_the_new_adapter(tmp_path, model, exchange_works):
    out = tmp_path / "adapter"
    modapt.save(fill(model, 1.0), out)
    seen = []
    for kill_at in range(1, 20):
        code = save_in_child(fill(model, 2.0), out, kill_at, exchange_works=exchange_works)
        assert code in (0, 9), code
        value = loaded_value(out)
        seen.append(value)
        if code == 0:
            break
        if value == 2.0:  # the swap happened before the kill: start again from the old save
            modapt.save(fill(model, 1.0), out)
    assert code == 0 and seen[-1] == 2.0 and seen[0] == 1.0, seen
    assert kill_at >= (3 if exchange_works else 5), "fewer boundaries than expected: the injection did not run"
    # the next save clears what the killed savers left beside the folder
    modapt.save(fill(model, 3.0), out)
    assert loaded_value(out) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_first_save_killed_at_every_rename_leaves_nothing_or_the_adapter(tmp_path, model):
    for kill_at in (1, 2):
        out = tmp_path / f"fresh{kill_at}"
        assert save_in_child(fill(model, 2.0), out, kill_at) == 9
        if kill_at == 1:
            assert not out.exists()
            with pytest.raises(modapt.AdapterLoadError, match="no such adapter directory"):
                modapt.load(tiny_llama(), out)
        else:
            assert loaded_value(out) == 2.0


def test_two_savers_into_one_folder_one_wins_whole(tmp_path, model, monkeypatch):
    """The second saver starts while the first holds the folder: it fails, the first's save is whole."""
    out = tmp_path / "adapter"
    modapt.save(fill(model, 1.0), out)
    real_exchange, codes = atomic_folder.exchange, []

    def exchange_with_a_rival(a, b):
        other = modapt.apply(tiny_llama(), RECIPE)
        codes.append(save_in_child(fill(other, 5.0), out, None))
        return real_exchange(a, b)

    monkeypatch.setattr(atomic_folder, "exchange", exchange_with_a_rival)
    modapt.save(fill(model, 2.0), out)
    assert codes == [3]  # FolderBusyError in the rival
    assert loaded_value(out) == 2.0


def test_the_busy_error_is_one_line(tmp_path, model):
    out = tmp_path / "adapter"

    def write(folder):
        with pytest.raises(FolderBusyError, match=r"another process is saving into this folder") as info:
            modapt.save(model, out)
        assert "\n" not in str(info.value)

    atomic_folder.replace_folder(out, write)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["disk-full", "read-only", "denied"])
def test_an_os_failure_is_one_line_and_keeps_the_old_folder(tmp_path, model, monkeypatch, err):
    out = tmp_path / "adapter"
    modapt.save(fill(model, 1.0), out)

    def failing(path, data):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(persistence, "_write_file", failing)
    with pytest.raises(FolderWriteError, match=f"cannot be written \\({os.strerror(err)}\\); the previous") as info:
        modapt.save(fill(model, 2.0), out)
    assert "\n" not in str(info.value)
    assert loaded_value(out) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_file_size_limit_is_one_line_and_keeps_the_old_folder(tmp_path, model):
    """RLIMIT_FSIZE (``ulimit -f``) in a child: EFBIG, reported as a ModaptError."""
    out = tmp_path / "adapter"
    modapt.save(fill(model, 1.0), out)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            modapt.save(fill(model, 2.0), out)
        except modapt.ModaptError as exc:
            os.write(write_end, str(exc).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0 and "File too large" in message and "\n" not in message, message
    assert loaded_value(out) == 1.0


def test_files_of_others_in_the_folder_survive_a_save(tmp_path, model):
    """A Trainer checkpoint holds optimizer state beside the adapter: a save keeps it."""
    out = tmp_path / "checkpoint-2"
    modapt.save(fill(model, 1.0), out)
    (out / "optimizer.pt").write_bytes(b"state")
    (out / "runs").mkdir()
    (out / "runs" / "events").write_text("x")
    modapt.save(fill(model, 2.0), out)
    assert (out / "optimizer.pt").read_bytes() == b"state" and (out / "runs" / "events").read_text() == "x"
    assert loaded_value(out) == 2.0


def test_a_non_peft_recipe_drops_the_peft_files_of_an_earlier_save(tmp_path, model, modapt_registry):
    """Switching a folder from a PEFT-readable adapter to a modapt-only one leaves no stale PEFT file."""
    out = tmp_path / "adapter"
    modapt.save(model, out)
    assert (out / "adapter_config.json").is_file()
    # a recipe PEFT cannot express: two update methods' worth of per-layer dropout differences
    other = modapt.apply(tiny_llama(), {"adapter": [{"method": "lora", "r": 2, "targets": ["q_proj"]},
                                                    {"method": "lora", "r": 2, "dropout": 0.1,
                                                     "targets": ["v_proj"]}]})
    modapt.save(other, out)
    assert sorted(p.name for p in out.iterdir()) == ["modapt_adapter.json", "modapt_adapter.safetensors"]
    modapt.load(tiny_llama(), out)


# ------------------------------------------------------------------ the base fingerprint
EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of nothing


@pytest.mark.parametrize("fingerprint, match", [
    ({}, "records no base fingerprint"),
    ({"tensors": {}}, "records no base fingerprint"),
    ({"tensors": []}, "records no base fingerprint"),
    ({"sha256": EMPTY_DIGEST, "tensors": {}}, "records no base fingerprint, but its recipe adapts base weights"),
    ({"tensors": {"model.embed_tokens.weight": "abc"}}, "malformed base fingerprint entry for 'model.embed"),
    ({"tensors": {"k": {"dtype": "float32", "shape": ["4"], "sha256": "0"}}}, "malformed base fingerprint entry"),
    ({"tensors": {"k": {"dtype": 3, "shape": [4], "sha256": "0"}}}, "malformed base fingerprint entry"),
], ids=["empty", "no-tensors", "list", "claims-no-base", "string-entry", "string-shape", "int-dtype"])
def test_a_missing_or_malformed_fingerprint_means_an_unknown_base(tmp_path, model, fingerprint, match):
    out = tmp_path / "adapter"
    modapt.save(fill(model, 1.0), out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_fingerprint"] = fingerprint
    (out / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_llama()
    with pytest.raises(modapt.AdapterLoadError, match=match) as info:
        modapt.load(base, out)
    assert "verify_base=False" in str(info.value) and "\n" not in str(info.value)
    assert not modapt.is_adapted(base)
    assert loaded_value_unverified(out) == 1.0


def loaded_value_unverified(directory):
    m = modapt.load(tiny_llama(), directory, verify_base=False)
    return {float(v) for t in modapt.adapter_state_dict(m).values() for v in t.detach().flatten().unique()}.pop()


# ------------------------------------------------------------------ untrusted files
def test_deeply_nested_json_is_one_line(tmp_path, model):
    out = tmp_path / "adapter"
    modapt.save(model, out)
    (out / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(modapt.AdapterLoadError, match="nested deeper than 64 levels"):
        modapt.load(tiny_llama(), out)


@pytest.mark.parametrize("shape, match", [([-1, 4], "not a list of integers >= 0"), (["2", 4], "not a list of"),
                                          ("2x4", "not a list of")])
def test_bad_shapes_in_a_safetensors_header_are_one_line(tmp_path, shape, match):
    from modapt.untrusted import UntrustedFileError, read_safetensors_header

    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 32]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(32))
    with pytest.raises(UntrustedFileError, match=match):
        read_safetensors_header(path)


def test_a_huge_tensor_file_is_refused_before_hashing(tmp_path, model, monkeypatch):
    """A sparse 8 GB file named like the tensors: its size does not match its header; never hashed."""
    out = tmp_path / "adapter"
    modapt.save(model, out)
    weights = out / "modapt_adapter.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(8 << 30)
    monkeypatch.setattr(persistence, "file_sha256", lambda p: pytest.fail("hashed before the size check"))
    with pytest.raises(modapt.AdapterLoadError, match="truncated or padded"):
        modapt.load(tiny_llama(), out)


# ------------------------------------------------------------------ earlier releases
def test_a_folder_saved_by_the_previous_release_loads(tmp_path):
    """``fixtures/format1_lora_r2``: format 1 (modapt's schema in adapter_config.json), LoRA r=2,
    alpha 4 on q/v of ``tiny_llama()``, tensors ~ 0.1 N(0, 1) (seed 35)."""
    from safetensors.torch import load_file

    model = modapt.load(tiny_llama(), FIXTURE)
    saved = load_file(FIXTURE / "adapter_model.safetensors")
    state = modapt.adapter_state_dict(model)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    # the logits, written out: W x + (alpha / r) B A x on q and v, against a plain model
    reference = tiny_llama()
    with torch.no_grad():
        for k in saved:
            if k.endswith("lora_A.weight"):
                path = k.removesuffix(".lora_A.weight")
                a, b = saved[k], saved[path + ".lora_B.weight"]
                reference.get_submodule(path).weight += (4 / 2) * b @ a
    inputs = tiny_inputs()
    torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)
    assert (FIXTURE / "adapter_config.json").stat().st_size + (FIXTURE / "adapter_model.safetensors").stat().st_size \
        < 100_000


def test_a_deeply_nested_json_recipe_is_one_line(tmp_path):
    from modapt.errors import RecipeError
    from modapt.recipe import read_recipe_file

    path = tmp_path / "deep.json"
    path.write_text('{"adapter": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(RecipeError, match="nested deeper than 64 levels") as info:
        read_recipe_file(path)
    assert "\n" not in str(info.value)
