"""Tiny random ``transformers`` models built from configs (no downloads), for tests.

Each factory is deterministic for a given seed, so two calls build the same weights: the
"fresh base model" of a save/load test is a second call.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerHolder(nn.Module):
    """A model of one layer, held as ``.layer`` (recipe target ``"layer"``) and called as it:
    the smallest host for a weight adapter in a test."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def tiny_llama(task: str = "causal-lm", seed: int = 0, **overrides):
    """LLaMA: hidden 64, 2 layers, 4 heads, 2 KV heads (grouped-query), vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, num_labels=2,
               attn_implementation="eager")
    cfg.update(overrides)
    cls = {"causal-lm": LlamaForCausalLM, "sequence-classification": LlamaForSequenceClassification,
           "feature-extraction": LlamaModel}[task]
    return _build(cls, LlamaConfig(**cfg), seed)


def tiny_gpt2(task: str = "causal-lm", seed: int = 0, **overrides):
    """GPT-2: n_embd 64, 2 layers, 4 heads, vocab 128 (Conv1D layers, fused c_attn)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

    cfg = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=2,
               attn_implementation="eager")
    cfg.update(overrides)
    cls = {"causal-lm": GPT2LMHeadModel, "sequence-classification": GPT2ForSequenceClassification,
           "feature-extraction": GPT2Model}[task]
    return _build(cls, GPT2Config(**cfg), seed)


def tiny_bert(task: str = "sequence-classification", seed: int = 0, **overrides):
    """BERT: hidden 64, 2 layers, 4 heads, intermediate 96, vocab 128 (an encoder)."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    cfg = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=256, pad_token_id=0, num_labels=2, attn_implementation="eager")
    cfg.update(overrides)
    cls = {"masked-lm": BertForMaskedLM, "causal-lm": BertForMaskedLM,
           "sequence-classification": BertForSequenceClassification, "feature-extraction": BertModel}[task]
    return _build(cls, BertConfig(**cfg), seed)


def _build(cls, config, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.eval()
    return model


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def tiny_inputs(batch: int = 2, seq: int = 8, vocab: int = 128, seed: int = 1, padded: bool = True):
    """``input_ids`` [batch, seq] and ``attention_mask`` (the first row right-padded by 2 when ``padded``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded and seq > 2:
        mask[0, -2:] = 0
        ids[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_model_dir(path, task: str = "sequence-classification", words: list[str] | None = None):
    """Save a tiny LLaMA and a word-level tokenizer to ``path`` (a local model folder for CLI tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or ["good", "bad", "movie", "film", "great", "awful", "plot", "actor", "fun", "dull"]
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    model = tiny_llama(task=task, vocab_size=128)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_losses(model, steps: int, lr: float = 1e-2, inputs=None) -> list[float]:
    """Train ``model``'s trainable parameters for ``steps`` AdamW steps on one causal-LM batch.

    The batch is :func:`tiny_inputs` (its ids are the labels) unless ``inputs`` is given; returns
    the loss of every step, for "this adapter learns" tests.
    """
    import modapt

    opt = torch.optim.AdamW(modapt.trainable_parameters(model).values(), lr=lr)
    inputs = inputs if inputs is not None else tiny_inputs()
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def write_sentiment_csv(path, rows: int = 200, seed: int = 0):
    """A learnable toy sentiment CSV (columns ``text``, ``sentiment`` = pos/neg) in the words of
    :func:`tiny_model_dir`'s tokenizer: three polar words and three neutral ones per row."""
    import csv
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "sentiment"])
        for _ in range(rows):
            label = rng.random() < 0.5
            words = rng.choices(["good", "great", "fun"] if label else ["bad", "awful", "dull"], k=3)
            words += rng.choices(["movie", "film", "plot", "actor"], k=3)
            rng.shuffle(words)
            writer.writerow([" ".join(words), "pos" if label else "neg"])
    return path
