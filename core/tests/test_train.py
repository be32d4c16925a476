"""``modapt train``: a tiny random model and a CSV file, the outputs, errors, Ctrl-C, the HF callback."""

import json
import signal
import subprocess
import sys
import time

import pytest

from modapt.cli import main
from modapt.testing.models import tiny_model_dir, write_sentiment_csv

RECIPE = 'modules_to_save = ["score"]\n\n[[adapter]]\nmethod = "lora"\nr = 4\ntargets = ["q_proj", "v_proj"]\n'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tiny_model_dir(root / "model")
    write_sentiment_csv(root / "data.csv")
    (root / "recipe.toml").write_text(RECIPE)
    return root


def modapt(*args, **kw):
    return subprocess.run([sys.executable, "-m", "modapt.cli", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def test_trains_and_writes_outputs(workdir):
    out = workdir / "run"
    result = modapt("train", "--recipe", str(workdir / "recipe.toml"), "--model", str(workdir / "model"),
                    "--data", str(workdir / "data.csv"), "--label-column", "sentiment", "--out", str(out),
                    "--steps", "40", "--eval-every", "20", "--batch-size", "8", "--lr", "0.01", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert len(train) == 40 and [r["step"] for r in evals] == [20, 40]
    first, last = sum(r["loss"] for r in train[:8]) / 8, sum(r["loss"] for r in train[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    assert evals[-1]["val_accuracy"] > 0.8
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "best" / name).is_file() and (out / "last" / name).is_file()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "before training" in result.stdout and "after training" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.csv"], "no such file or directory: missing.csv"),
    (["--label-column", "stars"], "no label column 'stars'"),
    (["--recipe", "nothing.toml"], "no such recipe file"),
    (["--model", "/nonexistent"], "neither 'smollm2' nor a local transformers model directory"),
])
def test_bad_arguments_fail_before_training(workdir, args, message, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    base = {"--recipe": str(workdir / "recipe.toml"), "--model": str(workdir / "model"),
            "--data": str(workdir / "data.csv"), "--label-column": "sentiment"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [x for pair in base.items() for x in pair]
    # in-process: the same main() the console script runs, without paying for a new interpreter
    code = main(["train", *argv, "--out", str(workdir / "bad"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not (workdir / "bad" / "metrics.jsonl").exists()


def test_recipe_targeting_nothing_in_this_model(workdir, capsys):
    (workdir / "wrong.toml").write_text('[[adapter]]\nmethod = "lora"\ntargets = ["c_attn"]\n')
    code = main(["train", "--recipe", str(workdir / "wrong.toml"), "--model", str(workdir / "model"),
                 "--data", str(workdir / "data.csv"), "--label-column", "sentiment", "--out",
                 str(workdir / "wrong"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "matches no module" in err and "Traceback" not in err


def test_ctrl_c_saves_and_exits_cleanly(workdir):
    out = workdir / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "modapt.cli", "train", "--recipe", str(workdir / "recipe.toml"),
                             "--model", str(workdir / "model"), "--data", str(workdir / "data.csv"),
                             "--label-column", "sentiment", "--out", str(out), "--steps", "100000",
                             "--eval-every", "0", "--batch-size", "4", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"train"') >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted at step" in stdout and "Traceback" not in stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[-1]["event"] == "end" and rows[-1]["interrupted"] is True
    import modapt as m
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(workdir / "model")
    m.load(base, out / "last")  # the interrupted adapter is complete and loads


def test_hf_trainer_runs_the_hooks(modapt_registry, tmp_path):
    """ModaptTrainer calls before/after_optimizer_step once per step and adds the regularisation term."""
    import types

    import torch
    from transformers import TrainingArguments

    import modapt as m
    import modapt.lora
    from modapt.hf_callback import ModaptTrainer
    from modapt.testing import tiny_llama

    calls = []
    spy = types.SimpleNamespace(
        modapt_before_optimizer_step=m.hookimpl(lambda model, step: calls.append(("before", step))),
        modapt_after_optimizer_step=m.hookimpl(lambda model, step: calls.append(("after", step))),
        modapt_regularization_loss=m.hookimpl(lambda model: calls.append(("loss", None)) or torch.tensor(0.0)),
    )
    modapt_registry.register_plugin(modapt.lora, "lora", "modapt")
    modapt_registry.register_plugin(spy, "spy", "spy")
    model = m.apply(tiny_llama(task="sequence-classification"),
                    {"adapter": [{"method": "lora", "r": 2, "targets": ["q_proj"]}]})
    data = [{"input_ids": torch.randint(1, 128, (8,)), "labels": torch.tensor(i % 2)} for i in range(6)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, report_to=[],
                             save_strategy="no", use_cpu=True, logging_strategy="no")
    ModaptTrainer(model=model, args=args, train_dataset=data).train()
    assert [c for c in calls if c[0] != "loss"] == [("before", 0), ("after", 0), ("before", 1), ("after", 1),
                                                    ("before", 2), ("after", 2)]
    assert sum(c[0] == "loss" for c in calls) == 3
