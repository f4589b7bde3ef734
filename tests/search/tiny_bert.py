"""A tiny Hugging Face BERT sequence classifier taking token ids, as a builder the CLI can name
(`tests.search.tiny_bert:build`), and token-id data with a learnable label rule."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

VOCAB, T, N = 50, 8, 96


class Logits(nn.Module):
    """forward(input_ids) -> the classifier's logits (HF returns a ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def build(num_classes: int = 3) -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=num_classes,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Logits(transformers.BertForSequenceClassification(cfg))


def ids_and_labels(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids (n, T) in 0..VOCAB-1 and y = the first id mod 3."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(n, T)).astype(np.int64)
    return ids, ids[:, 0] % 3
