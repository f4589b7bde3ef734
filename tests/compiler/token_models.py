"""Tiny models taking token ids and an attention mask (int64), and padded batches for them.

`tagger` is a builder the CLI can name (`tests.compiler.token_models:tagger`); `bert` builds a tiny
Hugging Face BertForTokenClassification from a config (random weights, nothing downloaded).
"""
from __future__ import annotations

import torch
import torch.nn as nn

N, T, VOCAB, CLASSES = 3, 5, 11, 4


class Tagger(nn.Module):
    """Per-token logits (N, T, C) from ids and a 0/1 mask: embedding (row 0 is padding), the masked mean
    over the sequence added to every token, a hidden layer."""

    def __init__(self, vocab: int = VOCAB, dim: int = 6, classes: int = CLASSES) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix, self.out = nn.Linear(dim, dim), nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(torch.float32)
        h = self.emb(ids) * m
        ctx = h.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.out(torch.tanh(self.mix(h + ctx)))


def tagger(vocab: int = VOCAB, dim: int = 6, classes: int = CLASSES) -> nn.Module:
    return Tagger(vocab, dim, classes)


def bert(classes: int = CLASSES) -> nn.Module:
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, num_labels=classes,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # as torch trains it
    return transformers.BertForTokenClassification(cfg)


def padded_batch(seed: int, n: int = N, t: int = T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, labels): random ids in 1..VOCAB-1, each row padded (id 0, mask 0, label -100) after a
    random length of at least 1; one row is never padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[seed % n] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64)
    labels = torch.randint(0, CLASSES, (n, t), generator=g)
    ids[mask == 0], labels[mask == 0] = 0, -100
    return ids, mask, labels
