"""``modapt train`` under ``torchrun --nproc-per-node 2`` and ``accelerate launch --num_processes 2`` (gloo, CPU):
DDP, data sharded by rank, rank 0 alone writes."""

import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from modapt.testing.models import tiny_model_dir

RECIPE = 'modules_to_save = ["score"]\n\n[[adapter]]\nmethod = "lora"\nr = 4\ntargets = ["q_proj", "v_proj"]\n'


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    pytest.importorskip("accelerate")
    # --multi_gpu is accelerate's name for "several processes, torch.distributed"; on a machine
    # without CUDA it launches CPU processes and modapt picks gloo
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m"]


@pytest.mark.parametrize("launch", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_modapt_train_under_a_launcher(tmp_path, launch):
    tiny_model_dir(tmp_path / "model")
    rng = random.Random(0)
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "sentiment"])
        for _ in range(100):
            label = rng.random() < 0.5
            words = rng.choices(["good", "great", "fun"] if label else ["bad", "awful", "dull"], k=3)
            writer.writerow([" ".join(words + ["movie"]), "pos" if label else "neg"])
    (tmp_path / "recipe.toml").write_text(RECIPE)
    out = tmp_path / "run"
    cmd = [*launcher(launch), "modapt.cli", "train", "--recipe", str(tmp_path / "recipe.toml"), "--model", str(tmp_path / "model"), "--data",
           str(tmp_path / "data.csv"), "--label-column", "sentiment", "--out", str(out), "--steps", "4",
           "--eval-every", "2", "--batch-size", "4", "--lr", "0.01", "--no-progress"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = rows[0]
    assert config["event"] == "config"
    # the training split of 100 examples is 76; each of the 2 ranks gets 38
    assert config["train_examples"] == 38, config
    assert [r["step"] for r in rows if r["event"] == "train"] == [0, 1, 2, 3]  # one writer: no duplicate rows
    assert [r["step"] for r in rows if r["event"] == "eval"] == [2, 4]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / "last" / name).is_file() and (out / "best" / name).is_file()
    from safetensors.torch import load_file

    tensors = load_file(out / "last" / "adapter_model.safetensors")
    lora_b = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b)  # trained (B starts at zero)
