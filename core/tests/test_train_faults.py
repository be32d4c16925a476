"""``modapt train`` killed or interrupted at deterministic points (issue 41).

The mechanism of core/tests/test_save_faults.py: a forked child runs ``modapt train`` (``main``,
in-process) with :data:`modapt.trainer.FAULT_HOOK` set and ``os.rename`` / ``os.replace`` /
the directory exchange wrapped, and ``os._exit``s (no cleanup runs, as with SIGKILL) at the Nth
rename boundary inside the replacement of ``best/`` or ``last/``, or when the final evaluation
starts; or it sends itself SIGINT at a named point. The parent then loads ``best/`` and ``last/``
on a fresh model: each must load and hold exactly the previous run's adapter or the new one,
never a mix; after a Ctrl-C anywhere, ``last/`` loads.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

import modapt
from modapt import atomic_folder, trainer
from modapt.cli import main
from modapt.testing.models import tiny_model_dir, write_sentiment_csv

RECIPE = 'modules_to_save = ["score"]\n\n[[adapter]]\nmethod = "lora"\nr = 4\ntargets = ["q_proj", "v_proj"]\n'
KILLED = 9


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_faults")
    tiny_model_dir(root / "model")
    write_sentiment_csv(root / "data.csv", rows=60)
    (root / "recipe.toml").write_text(RECIPE)
    return root


def argv(workdir, out, *extra):
    return ["train", "--recipe", str(workdir / "recipe.toml"), "--model", str(workdir / "model"),
            "--data", str(workdir / "data.csv"), "--label-column", "sentiment", "--out", str(out),
            "--batch-size", "4", "--lr", "0.01", "--no-progress", "--overwrite", *extra]


def loaded(workdir, folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(workdir / "model")
    modapt.load(model, folder)  # a half-written or mixed folder fails here (sha256 / missing files)
    return {k: v.detach().clone() for k, v in modapt.adapter_state_dict(model).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def in_child(args: list[str], setup) -> int:
    """Fork; the child arms the faults (``setup()``) and runs ``modapt train``; its exit status."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        # the parent's OpenMP thread pool does not survive fork (libgomp: a parallel region in the
        # child crashes); one thread keeps every kernel on the calling thread
        torch.set_num_threads(1)
        try:
            setup()
            code = main(args)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent through the code
            print(f"child failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def kill_inside_save(folder: str, kill_at: int, dump, exchange_works: bool = True) -> None:
    """Exit at rename boundary ``kill_at`` (before/after each rename, counted from 1) while
    ``folder`` is being replaced; what that save writes is dumped to ``dump`` first. Without
    ``exchange_works`` the save takes its two-renames-and-a-journal path."""
    active, count = [False], [0]

    def hook(point, model):
        if point == f"save:{folder}":
            torch.save({k: v.detach().clone() for k, v in modapt.adapter_state_dict(model).items()}, dump)
            active[0] = True
        elif point == f"saved:{folder}":
            active[0] = False

    def event():
        if active[0]:
            count[0] += 1
            if count[0] == kill_at:
                os._exit(KILLED)

    def wrap(fn):
        def wrapped(*a, **k):
            event()
            out = fn(*a, **k)
            event()
            return out
        return wrapped

    os.rename, os.replace = wrap(os.rename), wrap(os.replace)
    atomic_folder.exchange = wrap(atomic_folder.exchange if exchange_works else (lambda a, b: False))
    trainer.FAULT_HOOK = hook


@pytest.fixture
def earlier_run(workdir):
    """An earlier run's best/ and last/ in run/ (seed 0); the runs under test use seed 1."""
    out = workdir / "run"
    assert main(argv(workdir, out, "--steps", "2", "--eval-every", "0")) == 0
    return out, loaded(workdir, out / "best"), loaded(workdir, out / "last")


@pytest.mark.parametrize("exchange_works", [True, False], ids=["renameat2-exchange", "two-renames-journal"])
@pytest.mark.parametrize("folder", ["best", "last"])
def test_killed_while_replacing_a_folder_leaves_the_old_or_the_new_adapter(workdir, earlier_run, folder,
                                                                           exchange_works, capfd):
    """``--eval-every 0``: last/ is replaced once, then best/ once after the final evaluation."""
    out, *_ = earlier_run
    dump = workdir / f"new-{folder}.pt"
    outcomes = []
    for kill_at in range(1, 16):
        old = {name: loaded(workdir, out / name) for name in ("best", "last")}
        code = in_child(argv(workdir, out, "--steps", "2", "--eval-every", "0", "--seed", "1"),
                        lambda: kill_inside_save(folder, kill_at, dump, exchange_works))
        assert code in (0, KILLED), capfd.readouterr().out[-2000:]
        new = torch.load(dump)
        assert not same(new, old[folder])  # the new run writes other values
        now = {name: loaded(workdir, out / name) for name in ("best", "last")}
        outcomes.append("new" if same(now[folder], new) else "old" if same(now[folder], old[folder]) else "mix")
        assert outcomes[-1] != "mix", outcomes
        other = "best" if folder == "last" else "last"
        if folder == "last" and code == KILLED:  # killed before best/ was touched
            assert same(now[other], old[other])
        if code == 0:
            break
    print(f"{folder}/ kill outcomes ({'exchange' if exchange_works else 'journal'}):", outcomes)
    assert code == 0 and outcomes[0] == "old" and outcomes[-1] == "new" and len(outcomes) >= 3, outcomes


def test_killed_during_the_final_evaluation_keeps_the_new_last_and_the_old_best(workdir, earlier_run):
    out, old_best, old_last = earlier_run
    dump = workdir / "final-eval.pt"

    def setup():
        def hook(point, model):
            if point == "final-eval":
                torch.save({k: v.detach().clone() for k, v in modapt.adapter_state_dict(model).items()}, dump)
                os._exit(KILLED)
        trainer.FAULT_HOOK = hook

    assert in_child(argv(workdir, out, "--steps", "2", "--eval-every", "0", "--seed", "1"), setup) == KILLED
    assert same(loaded(workdir, out / "last"), torch.load(dump))
    assert same(loaded(workdir, out / "best"), old_best) and not same(old_best, torch.load(dump))


@pytest.mark.parametrize("point", ["step:0", "step:1", "save:best", "rename:best", "saved:best", "save:last",
                                   "saved:last", "final-eval"])
def test_ctrl_c_at_any_point_leaves_a_loadable_last(workdir, tmp_path, point):
    """SIGINT (the real signal, through modapt train's handler) at each point of a 3-step run that
    evaluates and may replace best/ after every step."""
    out = tmp_path / "run"

    def setup():
        sent = [False]

        def ctrl_c():
            if not sent[0]:
                sent[0] = True
                os.kill(os.getpid(), signal.SIGINT)

        def hook(p, model):
            if p == point:
                ctrl_c()
        trainer.FAULT_HOOK = hook
        if point == "rename:best":  # in the middle of best/'s replacement
            def interrupting(fn):
                def wrapped(a, b, *rest, **kw):
                    if os.path.basename(b) == "best":  # the first save renames, later ones exchange
                        ctrl_c()
                    return fn(a, b, *rest, **kw)
                return wrapped
            os.rename, atomic_folder.exchange = interrupting(os.rename), interrupting(atomic_folder.exchange)

    code = in_child(argv(workdir, out, "--steps", "3", "--eval-every", "1"), setup)
    assert code == 130, code
    last = loaded(workdir, out / "last")
    assert last and all(torch.isfinite(v).all() for v in last.values())
    if (out / "best").exists():
        loaded(workdir, out / "best")
