"""Every user-reachable failure of the CLI: exit 1 (2 for usage), one line naming the file or option
and the cause, no traceback unless ``--debug``; nothing written when a write fails.

Most cases call ``modapt.cli.main`` in this process; the file-size limit runs in a forked child
(the limit must not hit pytest), and the closed pipe in a fresh process (the interpreter's own
flush at exit is what prints a traceback there).
"""

from __future__ import annotations

import errno
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import modapt
import modapt.cli
import modapt.lora
import pydantic
import pytest
import torch
from modapt.registry import default_registry
from modapt.testing import tiny_llama

pytest.importorskip("modapt_export")
import modapt_export.plugin  # noqa: E402
from modapt_export import export_cli  # noqa: E402

RECIPE = {"adapter": [{"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}]}


@pytest.fixture
def root(tmp_path, modapt_registry):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    modapt_registry.register_plugin(modapt_export.plugin, "export", "modapt-export")
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="60KB")
    model = modapt.apply(tiny_llama(), RECIPE)
    modapt.save(model, tmp_path / "adapter")
    return tmp_path


def run(capsys, *argv) -> tuple[int, str]:
    code = modapt.cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("modapt: error: ") or lines[0].startswith("usage:") or "error:" in lines[0], err
    return lines[0]


def merge_args(root: Path, out: Path | None = None) -> list[str]:
    return ["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out or root / "out"),
            "--quiet"]


def no_output(root: Path) -> bool:
    return not (root / "out").exists() and not [p for p in root.iterdir() if p.name.startswith(".out.")]


# ------------------------------------------------------------------------------------ write failures
@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                         (errno.EDQUOT, "quota")])
def test_merge_write_failures_are_one_line(root, capsys, monkeypatch, code, cause):
    """A full disk / read-only folder in the middle of the shards (root ignores chmod: injected at the write)."""
    from modapt_export import merge

    real = merge.write_shard
    calls = []

    def failing(src, header, dst, *rest):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, header, dst, *rest)

    monkeypatch.setattr(merge, "write_shard", failing)
    status, err = run(capsys, *merge_args(root))
    line = one_line(err)
    assert status == 1 and cause in line and str(calls[1]) in line
    assert no_output(root)
    calls.clear()
    status, err = run(capsys, "--debug", *merge_args(root))
    assert status == 1 and "Traceback" in err  # --debug shows where


def test_merge_under_a_file_size_limit_is_one_line(root):
    """RLIMIT_FSIZE (ulimit -f): the write fails with EFBIG (Python ignores SIGXFSZ); nothing is left."""
    err_path = root / "stderr.txt"
    pid = os.fork()
    if pid == 0:
        try:
            import torch

            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: one thread in the child
            with open(err_path, "w") as err:
                sys.stderr = err
                resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
                code = modapt.cli.main(merge_args(root))
                err.flush()
        finally:
            os._exit(locals().get("code", 99))
    _, status = os.waitpid(pid, 0)
    err = err_path.read_text()
    assert os.WEXITSTATUS(status) == 1, err
    line = one_line(err)
    assert "file-size limit" in line and f"{root}/.out." in line and ".safetensors:" in line, line  # the shard
    assert no_output(root)


def test_merge_into_a_read_only_parent_is_one_line(root, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    status, err = run(capsys, *merge_args(root))
    assert status == 1 and "read-only" in one_line(err) and str(root) in err


# ------------------------------------------------------------------------------------ missing distribution
def test_merge_without_modapt_export_names_the_distribution(tmp_path, capsys):
    registry = modapt.Registry(autoload=False)
    registry.register_plugin(modapt.lora, "lora", "modapt")
    with modapt.use_registry(registry):
        status, err = run(capsys, "merge", "--base", "b", "--adapter", "a", "--out", str(tmp_path / "o"))
    assert status == 1 and "pip install modapt-export" in one_line(err) and "unrecognized" not in err


# ------------------------------------------------------------------------------------ export onnx arguments
def onnx_args(root: Path, *extra: str, out: Path | None = None) -> list[str]:
    return ["export", "onnx", "--base", str(root / "base"), "--out", str(out or root / "onnx"),
            "--task", "causal-lm", *extra]


def test_export_device_banana_and_missing_cuda(root, capsys):
    status, err = run(capsys, *onnx_args(root, "--device", "banana"))
    assert status == 1 and "--device 'banana'" in one_line(err)
    if not torch.cuda.is_available():
        status, err = run(capsys, *onnx_args(root, "--device", "cuda"))
        assert status == 1 and "CUDA is not available" in one_line(err)
    assert not (root / "onnx").exists()


def test_export_out_an_existing_file(root, capsys):
    (root / "file.onnx").write_bytes(b"keep")
    status, err = run(capsys, *onnx_args(root, out=root / "file.onnx"))
    assert status == 1 and "is not a folder" in one_line(err)
    assert (root / "file.onnx").read_bytes() == b"keep"
    status, err = run(capsys, *onnx_args(root, out=root / "base"))
    assert status == 1 and "never writes over its inputs" in one_line(err)


@pytest.mark.parametrize("extra, words", [(("--opset", "5"), "opset 5 is not supported"),
                                          (("--opset", "23"), "opset 23 is not supported"),
                                          (("--tolerance", "nan"), "not a finite number"),
                                          (("--tolerance", "-1"), "is not > 0")])
def test_export_bad_numbers_are_usage_errors(root, capsys, extra, words):
    with pytest.raises(SystemExit) as info:
        modapt.cli.main(onnx_args(root, *extra))
    err = capsys.readouterr().err
    assert info.value.code == 2 and words in err and "Traceback" not in err


def test_supported_opsets_pass_the_argument_check():
    assert [export_cli.opset(str(o)) for o in (18, 20, 22, 24, 25)] == [18, 20, 22, 24, 25]


# ------------------------------------------------------------------------------------ closed stdout
def test_plugins_into_a_closed_pipe_is_quiet():
    """`modapt plugins | head -1`: no BrokenPipeError traceback from the final flush, exit 1."""
    proc = subprocess.Popen([sys.executable, "-m", "modapt.cli", "plugins"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "MODAPT_PLUGINS": "lora"})
    proc.stdout.readline()
    proc.stdout.close()  # what head -1 does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 1)  # 0 when everything fitted in the pipe before it closed
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_broken_stdout_in_process_exits_1_quietly(monkeypatch, modapt_registry, capsys):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")

    class Closed:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    with monkeypatch.context() as patch:  # undone before capsys is torn down (it restores sys.stdout too)
        patch.setattr(sys, "stdout", Closed())
        assert modapt.cli.main(["plugins"]) == 1
    assert capsys.readouterr().err == ""


def test_internal_errors_are_one_line_unless_debug(monkeypatch, modapt_registry, capsys):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    monkeypatch.setattr(modapt.cli, "_plugins_payload", lambda *a: {}["boom"])
    status, err = run(capsys, "plugins")
    assert status == 1 and "internal error: KeyError" in one_line(err) and "--debug" in err
    status, err = run(capsys, "--debug", "plugins")
    assert status == 1 and "Traceback" in err


# ------------------------------------------------------------------------------------ values
def _floats_and_counts(options: type[modapt.Options]):
    for name, field in options.model_fields.items():
        text = str(field.annotation)
        bounded = any(type(m).__name__ in ("Ge", "Gt") for m in field.metadata)
        if "float" in text:
            yield name, "float", "list" in text
        elif "int" in text and not bounded:
            yield name, "int", "list" in text


def test_every_registered_methods_float_options_refuse_nan_and_inf():
    """Walk every installed method: one rule in modapt.Options refuses NaN/±Inf in each float option
    and negative values in each count that sets no bound of its own."""
    registry = default_registry()
    methods = registry.methods
    assert {"lora", "additive"} <= set(methods)
    checked = 0
    for name, method in sorted(methods.items()):
        for field, kind, is_list in _floats_and_counts(method.options):
            bad_values = [math.nan, math.inf, -math.inf] if kind == "float" else [-1]
            for bad in bad_values:
                with pytest.raises(pydantic.ValidationError) as info:
                    method.options.model_validate({field: [bad] if is_list else bad})
                locs = [e["loc"][:1] for e in info.value.errors()]
                assert (field,) in locs, (name, field, bad, info.value.errors())
                checked += 1
    assert checked >= 3
    print(f"\nnon-finite / negative option values refused: {checked} cases over {len(methods)} methods")


@pytest.mark.parametrize("entry", [
    {"method": "lora", "targets": ["q_proj"], "lora_alpha": math.inf},
    {"method": "lora", "targets": ["q_proj"], "dropout": math.nan},
])
def test_recipe_check_refuses_non_finite_values(tmp_path, capsys, modapt_registry, entry):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    import json

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"adapter": [entry]}))  # json writes Infinity / NaN, which json reads back
    status, err = run(capsys, "recipe", "check", str(path))
    assert status == 1 and "finite number" in one_line(err) and str(path) in err


def test_nested_quantifier_targets_are_refused_at_recipe_check(tmp_path, capsys, modapt_registry):
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    path = tmp_path / "r.toml"
    path.write_text('[[adapter]]\nmethod = "lora"\ntargets = ["re:(.*.*.*.*.*)*X"]\n')
    status, err = run(capsys, "recipe", "check", str(path))
    line = one_line(err)
    assert status == 1 and "adapter[0].targets[0]" in line and "nested quantifiers" in line


# ------------------------------------------------------------------------------------ export onnx write failures
def no_onnx_output(root: Path) -> bool:
    return not (root / "onnx").exists() and not [p for p in root.iterdir() if p.name.startswith(".onnx.")]


def test_export_onnx_under_a_file_size_limit_is_one_line(root):
    """RLIMIT_FSIZE while model.onnx is written: exit 1, the file and the cause, nothing left.

    A fresh process (not a fork of pytest): after torch.compile or OpenMP work in this process a
    forked child can crash inside a kernel, which would hide what is tested here."""
    def limit():  # the tiny model's graph is ~200 kB, its config and stderr far less
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    code = "import sys, modapt.cli; sys.exit(modapt.cli.main(sys.argv[1:]))"
    args = onnx_args(root, "--quiet", "--adapter", str(root / "adapter"))
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, preexec_fn=limit,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("modapt: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    line = errors[0]
    assert "file-size limit" in line and f"{root}/.onnx.partial-" in line and "model.onnx" in line, line
    assert no_onnx_output(root)


@pytest.mark.parametrize("code, cause", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")])
def test_export_onnx_into_a_read_only_or_full_parent_is_one_line(root, capsys, monkeypatch, code, cause):
    """The hidden folder cannot be made (read-only parent; root ignores chmod, so injected at mkdtemp)."""
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code), kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", failing)
    status, err = run(capsys, *onnx_args(root, "--quiet"))
    line = one_line(err)
    assert status == 1 and cause in line and str(root) in line
    assert no_onnx_output(root)
