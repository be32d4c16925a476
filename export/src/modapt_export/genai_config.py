"""``genai_config.json``: what ONNX Runtime GenAI (0.18) needs to run a causal-LM export folder.

``og.Model(OUT_DIR)`` reads this file, the graph it names (``model.onnx``) and, for text in and out,
the tokenizer files saved beside it (``tokenizer.json``, ``tokenizer_config.json``). The export's
graph already has GenAI's layout (``input_ids``, ``attention_mask`` [batch, past + seq],
``position_ids``, ``past_key_values.%d.key``/``.value`` -> ``logits``, ``present.%d.key``/``.value``
[batch, kv_heads, past + seq, head_dim]); the file names that layout and the geometry:

    model.decoder: filename, head_size, hidden_size, num_attention_heads, num_key_value_heads,
                   num_hidden_layers, inputs/outputs name patterns, session_options (providers)
    model: type, vocab_size, context_length, bos/eos/pad token ids
    search: greedy/sampling defaults from generation_config.json

``past_present_share_buffer`` is false: the graph returns present = concat(past, new), it does not
write into a preallocated buffer of the full context length.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import modapt

from .onnx_io import cache_geometry

GENAI_CONFIG = "genai_config.json"
#: model types ONNX Runtime GenAI 0.18 runs as plain decoders; another type is written as "llama",
#: which selects the same decoder-only pipeline (the graph's layout is what matters)
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo",
                 "nemotron", "smollm3")


class GenAIMismatchError(modapt.ModaptError):
    """ONNX Runtime GenAI's greedy tokens differ from PyTorch's ``generate``."""


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _token_id(value):
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return None if value is None else int(value)


def genai_config(config, generation_config=None, filename: str = "model.onnx", device: str = "cpu") -> dict:
    """The ``genai_config.json`` dictionary for an export of ``config`` (a transformers config).

    ``device`` ``"cuda"`` configures the CUDA provider in the decoder's session options (GenAI falls
    back to nothing else: a folder written for CUDA needs onnxruntime-genai-cuda); ``"cpu"`` leaves
    the provider list empty, which GenAI reads as its CPU provider.
    """
    text = _text_config(config)
    geo = cache_geometry(config)
    gen = generation_config

    def token(name):  # generation_config first (what generate uses), then the model config
        value = getattr(gen, name, None) if gen is not None else None
        return _token_id(value if value is not None else getattr(text, name, None))

    eos, bos, pad = token("eos_token_id"), token("bos_token_id"), token("pad_token_id")
    if pad is None:  # GenAI pads finished rows with it; transformers uses eos for that
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    context = int(getattr(text, "max_position_embeddings", None) or 2048)

    def search(name, default):
        value = getattr(gen, name, None) if gen is not None else None
        return default if value is None else value

    model_type = getattr(config, "model_type", None)
    providers = [{"cuda": {}}] if str(device).startswith("cuda") else []
    return {
        "model": {
            "bos_token_id": bos if bos is not None else 0,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": filename,
                "head_size": geo.head_dim,
                "hidden_size": int(text.hidden_size),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits",
                            "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": int(text.num_attention_heads),
                "num_hidden_layers": geo.num_layers,
                "num_key_value_heads": geo.kv_heads,
            },
            "eos_token_id": eos if eos is not None else pad,
            "pad_token_id": pad,
            "type": model_type if model_type in DECODER_TYPES else "llama",
            "vocab_size": int(text.vocab_size),
        },
        "search": {
            "diversity_penalty": float(search("diversity_penalty", 0.0)),
            "do_sample": bool(search("do_sample", False)),
            "early_stopping": True,
            "length_penalty": float(search("length_penalty", 1.0)),
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": int(search("no_repeat_ngram_size", 0)),
            "num_beams": int(search("num_beams", 1)),
            "num_return_sequences": int(search("num_return_sequences", 1)),
            "past_present_share_buffer": False,
            "repetition_penalty": float(search("repetition_penalty", 1.0)),
            "temperature": float(search("temperature", 1.0)),
            "top_k": int(search("top_k", 50)),
            "top_p": float(search("top_p", 1.0)),
        },
    }


def write_genai_folder(out_dir: Path, config, generation_config=None, device: str = "cpu") -> dict:
    """Write ``genai_config.json`` into ``out_dir`` and make the saved tokenizer readable by GenAI
    (``model_max_length`` as an integer: transformers writes 1e30 for "no limit", which GenAI's JSON
    reader rejects). Returns the config written."""
    cfg = genai_config(config, generation_config, device=device)
    (out_dir / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    tok_cfg = out_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        data = json.loads(tok_cfg.read_text(encoding="utf-8"))
        if not isinstance(data.get("model_max_length"), int) or data["model_max_length"] > cfg["model"]["context_length"]:
            data["model_max_length"] = cfg["model"]["context_length"]
            tok_cfg.write_text(json.dumps(data, indent=2) + "\n")
    return cfg


def import_genai():
    """``onnxruntime_genai`` or ``None`` when it is not installed (the check is then skipped)."""
    try:
        import onnxruntime_genai
    except ImportError:
        return None
    return onnxruntime_genai


def genai_greedy(folder: str | Path, prompt: list[int], max_new_tokens: int, adapter: tuple[str, str] | None = None
                 ) -> list[int]:
    """Greedy tokens (prompt included) from ONNX Runtime GenAI on ``folder``; ``adapter`` =
    (``.onnx_adapter`` path, name) activates one adapter. [len(prompt) + ≤ max_new_tokens]."""
    og = import_genai()
    if og is None:
        raise modapt.ModaptError("onnxruntime-genai is not installed (pip install 'modapt-export[genai]')")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter[0]), adapter[1])
        generator.set_active_adapter(adapters, adapter[1])
    generator.append_tokens([list(prompt)])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def torch_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """``model.generate(do_sample=False)`` tokens, prompt included (batch 1, no padding)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=0)
    return [int(t) for t in out[0].tolist()]


def check_prompt(config, length: int = 5, seed: int = 0) -> list[int]:
    """A fixed random prompt of ``length`` tokens (ids from 1, below the vocabulary)."""
    vocab = int(_text_config(config).vocab_size)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=gen).tolist()


def genai_check(folder: Path, prompt: list[int], expected: list[int], max_new_tokens: int,
                adapter: tuple[str, str] | None = None) -> dict:
    """Run GenAI's greedy generation on ``folder`` and compare with ``expected`` (PyTorch's tokens).

    Returns the report written to the manifest; raises :class:`GenAIMismatchError` on a difference.
    """
    t0 = time.perf_counter()
    got = genai_greedy(folder, prompt, max_new_tokens, adapter)
    report = {"passed": got == expected, "prompt_tokens": len(prompt), "new_tokens": len(got) - len(prompt),
              "seconds": round(time.perf_counter() - t0, 2)}
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        report["first_difference"] = first
        raise GenAIMismatchError(
            f"onnxruntime-genai's greedy tokens{f' (adapter {adapter[1]!r} active)' if adapter else ''} differ from PyTorch's generate at position {first}: "
            f"{got[len(prompt):]} vs {expected[len(prompt):]}")
    return report
