"""Text on the device: raw text -> token ids, attention mask and labels for a compiled sequence model.

Uses the `tokenizers` package (the optional extra `text`: `pip install 'pockprop[text]'`, wheels for
aarch64 too), never torch or transformers. A tokenizer is trained here from the text at hand
(`train_tokenizer`) or read from a tokenizer.json kept next to the artifact (`load_tokenizer`; Hugging
Face saves one with every tokenizer). `encode` pads and truncates to the compiled length; padding has
mask 0, and `next_token_labels` puts -100 (the loss's ignore_index) there. The arrays go into an .npz
named as the model's inputs (docs/artifact.md):

    tok = text.train_tokenizer(lines, vocab_size=trainer.manifest.data[0].range[1] + 1)
    ids, mask = text.encode(tok, lines, length=trainer.manifest.data[0].shape[1])
    np.savez("train.npz", input_ids=ids, attention_mask=mask, labels=text.next_token_labels(ids, mask))
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from pockprop.errors import DataError

PAD, UNK = "[PAD]", "[UNK]"  # the special tokens train_tokenizer adds, ids 0 and 1
_PAD_TOKENS = (PAD, "<pad>", "<|pad|>", "[pad]")
IGNORE_INDEX = -100  # the training graph's cross-entropy skips these labels (manifest loss.ignore_index)


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DataError("tokenizing text needs the tokenizers package: pip install 'pockprop[text]'") from None
    return tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "bpe") -> Any:
    """A tokenizer trained on `texts` (whitespace and punctuation split, then BPE merges or whole words)
    with at most `vocab_size` tokens, [PAD] = 0 and [UNK] = 1 among them."""
    tk = _tokenizers()
    if kind not in ("bpe", "wordlevel"):
        raise DataError(f"tokenizer kind must be 'bpe' or 'wordlevel', got {kind!r}")
    if vocab_size < 3:
        raise DataError(f"vocab_size must be at least 3 ([PAD], [UNK] and one token), got {vocab_size}")
    model, trainer = (tk.models.BPE(unk_token=UNK), tk.trainers.BpeTrainer) if kind == "bpe" else \
        (tk.models.WordLevel(unk_token=UNK), tk.trainers.WordLevelTrainer)
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False))
    return tok


def load_tokenizer(path: str) -> Any:
    """A tokenizer from its tokenizer.json; DataError naming the file if it cannot be read."""
    tk = _tokenizers()
    try:
        return tk.Tokenizer.from_file(path)
    except Exception as ex:  # tokenizers raises its own exception type for a missing or malformed file
        first = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
        raise DataError(f"{path}: not a readable tokenizer.json ({first})") from None


def pad_id(tokenizer: Any) -> int:
    """The id padding gets: the tokenizer's own padding setting, else its pad token, else 0 (any valid id
    does: padded positions have mask 0 and label -100)."""
    padding = tokenizer.padding
    if padding:
        return int(padding["pad_id"])
    for token in _PAD_TOKENS:
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def encode(tokenizer: Any, texts: Sequence[str], length: int,
           add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both int64 (len(texts), length): each text's tokens (with the special tokens a loaded
    tokenizer's post-processor adds, such as BERT's [CLS] and [SEP], unless add_special_tokens is False),
    truncated to `length`, then padded with pad_id(tokenizer); mask is 1 on tokens and 0 on padding."""
    if length < 1:
        raise DataError(f"length must be positive, got {length}")
    texts = list(texts)
    ids = np.full((len(texts), length), pad_id(tokenizer), np.int64)
    mask = np.zeros((len(texts), length), np.int64)
    for i, enc in enumerate(tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)):
        row = enc.ids[:length]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def next_token_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Causal language-model labels for logits (N, T, V) of (ids, mask): position t is labelled with the
    token at t + 1, and -100 where that token is padding or past the end."""
    labels = np.full(ids.shape, IGNORE_INDEX, np.int64)
    labels[:, :-1] = np.where((mask[:, :-1] == 1) & (mask[:, 1:] == 1), ids[:, 1:], IGNORE_INDEX)
    return labels
