"""``modapt train`` on the Trainer engine (issue 35): options and their help, bf16 autocast with
accumulation, accumulation = a larger batch, ``--resume`` after Ctrl-C = an uninterrupted run,
data that comes split keeps its splits. Tiny random models, CPU, a few steps each."""

from __future__ import annotations

import argparse
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from modapt import text_data, trainer
from modapt.cli import main
from modapt.testing.models import tiny_model_dir, write_sentiment_csv

RECIPE = 'modules_to_save = ["score"]\n\n[[adapter]]\nmethod = "lora"\nr = 4\ntargets = ["q_proj", "v_proj"]\n'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_engine")
    tiny_model_dir(root / "model")
    write_sentiment_csv(root / "data.csv")
    (root / "recipe.toml").write_text(RECIPE)
    return root


def argv(workdir, out, *extra):
    return ["train", "--recipe", str(workdir / "recipe.toml"), "--model", str(workdir / "model"),
            "--data", str(workdir / "data.csv"), "--label-column", "sentiment", "--out", str(out),
            "--no-progress", *extra]


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def rows(out, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def test_every_option_has_help_and_shows_its_default():
    from modapt.train_cli import configure

    parser = argparse.ArgumentParser(prog="modapt train")
    configure(parser)
    text = parser.format_help()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for flag in ("--precision", "--grad-accum", "--max-grad-norm", "--warmup", "--scheduler", "--resume",
                 "--gradient-checkpointing"):
        assert any(flag in a.option_strings for a in options), flag
    for action in options:
        assert action.help and action.help.strip(), action.option_strings
        if not action.required and action.nargs != 0:  # flags (store_true) have no value to show
            assert "%(default)" in parser.formatter_class(prog="x")._get_help_string(action), action.option_strings
    assert "(default: 5e-04)" in text.replace("0.0005", "5e-04") and "(default: 16)" in text
    assert "(default: linear)" in text and "(default: 1)" in text


def test_bf16_with_accumulation_decreases_the_loss(workdir, capsys):
    out = workdir / "bf16"
    code = main(argv(workdir, out, "--precision", "bf16", "--grad-accum", "4", "--batch-size", "4", "--steps", "8",
                     "--eval-every", "0", "--lr", "0.02"))
    assert code == 0, capsys.readouterr().err
    config = rows(out, "config")[0]
    assert config["precision"] == "bf16" and config["grad_accum"] == 4
    losses = [r["loss"] for r in rows(out, "train")]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_accumulation_equals_the_larger_batch_in_float32(workdir, capsys):
    """4 micro-batches of 2, accumulated = one batch of 8 (the same 8 examples: the sampler's
    order does not depend on the batch size), after 3 optimizer steps in float32; and
    ``--gradient-checkpointing`` changes nothing but memory."""
    common = ("--precision", "fp32", "--steps", "3", "--eval-every", "0", "--lr", "0.01")
    assert main(argv(workdir, workdir / "big", "--batch-size", "8", *common)) == 0
    assert main(argv(workdir, workdir / "accum", "--batch-size", "2", "--grad-accum", "4", *common)) == 0
    capsys.readouterr()
    big, accum = adapter(workdir / "big" / "last"), adapter(workdir / "accum" / "last")
    assert big.keys() == accum.keys()
    gap = max(float((big[k] - accum[k]).abs().max()) for k in big)
    print(f"accumulation vs batch: max |difference| {gap:.2e}")
    assert gap < 1e-5, gap
    # gradient checkpointing recomputes the same activations: the same adapter
    assert main(argv(workdir, workdir / "ckpt", "--batch-size", "8", "--gradient-checkpointing", *common)) == 0
    recomputed = adapter(workdir / "ckpt" / "last")
    assert max(float((big[k] - recomputed[k]).abs().max()) for k in big) < 1e-6
    # and the runs did train: B of LoRA starts at zero
    assert all(torch.count_nonzero(v) for k, v in big.items() if "lora_B" in k)


def test_resume_after_ctrl_c_ends_where_an_uninterrupted_run_ends(workdir, capsys, monkeypatch):
    common = ("--batch-size", "4", "--steps", "6", "--eval-every", "2", "--lr", "0.01")
    assert main(argv(workdir, workdir / "straight", *common)) == 0

    def ctrl_c_after_step_2(point, model):
        if point == "step:2":
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT through modapt train's handler

    monkeypatch.setattr(trainer, "FAULT_HOOK", ctrl_c_after_step_2)
    out = workdir / "resumed"
    assert main(argv(workdir, out, *common)) == 130
    assert "continue with --resume" in capsys.readouterr().out
    assert (out / "checkpoints" / "checkpoint-3").is_dir() and rows(out, "end")[-1]["interrupted"] is True
    monkeypatch.setattr(trainer, "FAULT_HOOK", None)
    assert main(argv(workdir, out, *common)) == 1  # an earlier run: refused without --resume
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(argv(workdir, out, *common, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    straight, resumed = adapter(workdir / "straight" / "last"), adapter(out / "last")
    assert straight.keys() == resumed.keys()
    gap = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
    print(f"resumed vs uninterrupted: max |difference| {gap:.2e}")
    assert gap < 1e-6, gap
    steps = [r["step"] for r in rows(out, "train")]
    assert steps == [0, 1, 2, 3, 4, 5]  # the resumed part starts where the first stopped
    assert [r["step"] for r in rows(out, "eval")] == [2, 4, 6]


def write_split_files(folder, suffix="csv"):
    folder.mkdir()
    splits = {"train": [("good fun", "pos"), ("awful dull", "neg")] * 10,
              "validation": [("great", "pos"), ("bad", "neg"), ("dull film", "neg")],
              "test": [("fun film", "pos")]}
    for name, data in splits.items():
        (folder / f"{name}.{suffix}").write_text("text,sentiment\n" + "".join(f"{t},{s}\n" for t, s in data))
    return splits


def test_a_split_folder_keeps_its_splits(workdir, capsys):
    splits = write_split_files(workdir / "split-folder")
    train, val, test, how = text_data.load_splits(str(workdir / "split-folder"), 0, label_column="sentiment")
    assert "kept the data's own splits (train, validation, test)" in how
    assert val.texts == [t for t, _ in splits["validation"]] and test.texts == ["fun film"]
    assert train.texts == [t for t, _ in splits["train"]]
    assert train.label_names == val.label_names == ["neg", "pos"] and val.labels == [1, 0, 0]
    single = text_data.load_splits(str(workdir / "data.csv"), 0, label_column="sentiment")
    assert "seeded split" in single[3] and len(single[0]) == 152  # 76 % of 200
    out = workdir / "split-run"
    args = argv(workdir, out, "--steps", "2", "--batch-size", "4")
    args[args.index("--data") + 1] = str(workdir / "split-folder")
    code = main(args)
    stdout = capsys.readouterr().out
    assert code == 0 and "kept the data's own splits" in stdout and "20 train / 3 validation / 1 test" in stdout


def test_a_dataset_dict_keeps_its_splits(workdir):
    datasets = pytest.importorskip("datasets")
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}),
        "validation": datasets.Dataset.from_dict({"text": ["v"], "label": [1]}),
    })
    data.save_to_disk(str(workdir / "dd"))
    train, val, test, how = text_data.load_splits(str(workdir / "dd"), 0)
    assert train.texts == ["a", "b", "c", "d"] and val.texts == ["v"] and val.labels == [1] and len(test) == 0
    assert "kept the data's own splits (train, validation)" in how
    only_train = datasets.DatasetDict({"train": data["train"]})
    only_train.save_to_disk(str(workdir / "dd-train"))
    assert "seeded split" in text_data.load_splits(str(workdir / "dd-train"), 0)[3]


def test_resume_without_a_checkpoint_is_one_line(workdir, capsys):
    assert main(argv(workdir, workdir / "nothing-yet", "--steps", "2", "--resume")) == 1
    err = capsys.readouterr().err
    assert "--resume: no checkpoint in" in err and len(err.strip().splitlines()) == 1
    assert main(argv(workdir, workdir / "x", "--steps", "2", "--resume", str(workdir))) == 1
    assert "not a training checkpoint" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(argv(workdir, workdir / "x", "--steps", "2", "--precision", "fp16")) == 1
        assert "--precision fp16 needs a CUDA device" in capsys.readouterr().err
