"""``modapt train`` refusals (issue 41): bad counts and rates, empty splits, an earlier run in
--out, and a loop that stops on a non-finite loss or adapter, keeping the last finite one."""

import json

import pytest
import torch

from modapt.cli import main
from modapt.testing.models import tiny_model_dir, write_sentiment_csv

RECIPE = 'modules_to_save = ["score"]\n\n[[adapter]]\nmethod = "lora"\nr = 4\ntargets = ["q_proj", "v_proj"]\n'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_refusals")
    tiny_model_dir(root / "model")
    write_sentiment_csv(root / "data.csv")
    (root / "recipe.toml").write_text(RECIPE)
    return root


def _argv(workdir, out, *extra):
    return ["train", "--recipe", str(workdir / "recipe.toml"), "--model", str(workdir / "model"),
            "--data", str(workdir / "data.csv"), "--label-column", "sentiment", "--out", str(out),
            "--batch-size", "4", "--no-progress", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--steps", "-5"], "--steps must be a finite number >= 0"),
    (["--epochs", "-1"], "--epochs must be a finite number >= 0"),
    (["--epochs", "nan"], "--epochs must be a finite number >= 0"),
    (["--epochs", "inf"], "--epochs must be a finite number >= 0"),
    (["--steps", "2", "--eval-every", "-1"], "--eval-every must be a finite number >= 0"),
    (["--steps", "2", "--lr", "nan"], "--lr must be a positive finite number"),
    (["--steps", "2", "--lr", "inf"], "--lr must be a positive finite number"),
    (["--steps", "2", "--limit", "0"], "--limit 0 leaves no training examples"),
    (["--steps", "2", "--limit", "-1"], "--limit must be a finite number >= 0"),
])
def test_bad_numbers_are_refused_in_one_line(workdir, extra, message, capsys):
    out = workdir / "refused"
    code = main(_argv(workdir, out, *extra))
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "metrics.jsonl").exists()


def test_one_row_file_is_refused_not_looped(workdir, capsys):
    (workdir / "one.csv").write_text("text,sentiment\ngood film,1\n")
    argv = _argv(workdir, workdir / "one", "--steps", "2")
    argv[argv.index("--data") + 1] = str(workdir / "one.csv")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "no training examples" in err and "Traceback" not in err, err


def test_earlier_run_is_refused_unless_overwrite(workdir, capsys):
    out = workdir / "earlier"
    (out / "best").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"event": "config"}\n')
    code = main(_argv(workdir, out, "--steps", "1", "--eval-every", "0"))
    err = capsys.readouterr().err
    assert code == 1 and "holds an earlier run" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == '{"event": "config"}\n'  # untouched
    assert main(_argv(workdir, out, "--steps", "1", "--eval-every", "0", "--overwrite")) == 0
    assert (out / "last" / "adapter_config.json").is_file()


def test_divergence_stops_keeps_last_finite_adapter_and_exits_1(workdir, capsys):
    out = workdir / "diverged"
    code = main(_argv(workdir, out, "--steps", "50", "--eval-every", "0", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert code == 1 and "training stopped: non-finite" in err and "at step" in err and "Traceback" not in err, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stop = [r for r in rows if r["event"] == "diverged"]
    assert len(stop) == 1 and stop[0]["step"] < 50
    import modapt
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(workdir / "model")
    modapt.load(model, out / "last")
    tensors = modapt.trainable_parameters(model)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


def test_missing_matplotlib_names_the_extra(workdir, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = workdir / "noplot"
    assert main(_argv(workdir, out, "--steps", "1", "--eval-every", "0")) == 0
    stdout = capsys.readouterr().out
    assert "curves: not drawn" in stdout and "modapt[train]" in stdout and "curves: None" not in stdout
    assert not (out / "curves.png").exists()


@pytest.mark.parametrize("name, content, message", [
    ("lists.jsonl", '[1, 2]\n"x"\n', "line 1 of {path} is a JSON list, not an object"),
    ("array.json", '[{"text": "good", "sentiment": 1}]', "line 1 of {path} is a JSON list, not an object"),
    ("ragged.csv", "text,sentiment\ngood film,1,3\nbad film,0\n", "row 1 of {path} has more values"),
    ("short.csv", "text,sentiment\ngood film,1\nbad film\n", "row 2 of {path} has fewer values"),
    ("nolabel.csv", "text,sentiment\ngood film,1\nbad film,\n", "row 2 of {path} has no value in label column"),
])
def test_data_that_is_not_what_train_reads_is_one_line(workdir, name, content, message, capsys):
    path = workdir / name
    path.write_text(content)
    argv = _argv(workdir, workdir / f"out-{name}", "--steps", "1")
    argv[argv.index("--data") + 1] = str(path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and message.format(path=path) in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, message", [
    ("tokenizer", "cannot load a tokenizer from"),
    ("config", "cannot load a tokenizer from"),  # transformers reads config.json for the tokenizer first
    ("weights", "cannot load the model in"),
    ("pickle-only", "cannot load the model in"),  # a pytorch_model.bin is never unpickled
])
def test_model_folders_that_cannot_load_are_one_line(workdir, damage, message, capsys):
    import shutil

    model = workdir / f"model-{damage}"
    shutil.copytree(workdir / "model", model)
    if damage == "tokenizer":
        for f in model.glob("tokenizer*"):
            f.unlink()
    elif damage == "config":
        (model / "config.json").write_text("{")
    else:
        for f in model.glob("*.safetensors"):
            if damage == "pickle-only":
                from safetensors.torch import load_file

                torch.save(load_file(f), model / "pytorch_model.bin")
            f.unlink()
    argv = _argv(workdir, workdir / f"out-{damage}", "--steps", "1")
    argv[argv.index("--model") + 1] = str(model)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and message in err and str(model) in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_folder_that_is_not_a_saved_dataset_is_one_line(workdir, capsys):
    folder = workdir / "not-a-dataset"
    folder.mkdir()
    argv = _argv(workdir, workdir / "out-folder", "--steps", "1")
    argv[argv.index("--data") + 1] = str(folder)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "is a folder but not a saved Hugging Face dataset" in err and "Traceback" not in err, err


def test_a_plot_that_cannot_be_written_names_its_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import errno

    from matplotlib.figure import Figure
    from modapt import trainer

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")  # what a write under ulimit -f raises, with no name

    monkeypatch.setattr(Figure, "savefig", full_disk)
    history = [{"event": "train", "step": 1, "loss": 1.0}, {"event": "eval", "step": 1, "val_loss": 1.0}]
    with pytest.raises(OSError) as caught:
        trainer._plot(history, tmp_path / "curves.png")
    assert caught.value.filename == str(tmp_path / "curves.tmp.png") and caught.value.errno == errno.EFBIG
    assert not list(tmp_path.iterdir())
