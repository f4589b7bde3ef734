"""Hugging Face transformers in the zoo, built from configs with random weights (never downloaded).

``llama_small`` is a Llama-shaped causal language model (``LlamaForCausalLM``: RMS norm, rotary
positions, SwiGLU feed-forward, untied LM head) and ``bert_base4`` a BERT-base-shaped sequence classifier
(``BertForSequenceClassification``: BERT-base's widths and vocabulary at 4 of its 12 layers). Both take
one int64 input, token ids of shape (batch, sequence), and return logits: (N, T, vocab) for the language
model (train it with labels (N, T), -100 where a position does not count), (N, classes) for the classifier.
``vit_tiny`` is a tiny ViT image classifier (``ViTForImageClassification``), 32x32 images in.

The models are the transformers classes themselves, with ``forward(input_ids)`` returning the logits
tensor instead of a ModelOutput, so parameter names are transformers' (``model.layers.3.mlp.gate_proj``,
``bert.encoder.layer.2.intermediate.dense``) and a state_dict saved from one loads into the other.
Dropout is 0 so that a training step is a function of its inputs, as pockprop compiles it.

transformers is imported when a builder is called, not when the zoo is listed: it is an optional
dependency of the compile side, never of the device runtime.
"""
from __future__ import annotations

import functools
from typing import Any

from pockprop.errors import CompileError

__all__ = ["llama_small", "bert_base4", "vit_tiny"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise CompileError("this zoo model is built with Hugging Face transformers, which is not installed: "
                           "pip install transformers") from None
    return transformers


@functools.cache
def _logits_only(cls: type) -> type:
    """A subclass of the transformers model class `cls` whose forward takes token ids and returns the logits."""

    class LogitsOnly(cls):  # type: ignore[valid-type, misc]
        # one input, one output, as pockprop traces; inputs_embeds and attention_mask as transformers takes them
        # (a soft prompt, compiler/prompt.py, calls the model with its embeddings prepended)
        def forward(self, input_ids: Any = None, attention_mask: Any = None, inputs_embeds: Any = None) -> Any:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds).logits

    LogitsOnly.__name__ = LogitsOnly.__qualname__ = cls.__name__
    return LogitsOnly


def llama_small(vocab_size: int = 2048, hidden: int = 256, layers: int = 8, heads: int = 4,
                kv_heads: int | None = None, intermediate: int | None = None, max_positions: int = 1024) -> Any:
    """A Llama-shaped causal LM: 8 layers of width 256, 4 heads of 64, SwiGLU width 768 (Llama's rule:
    8/3 of the width rounded up to a multiple of 256), a 2,048-token vocabulary, untied LM head (7.9 M
    parameters). kv_heads < heads gives grouped-query attention."""
    T = _transformers()
    if intermediate is None:
        intermediate = -(-(8 * hidden // 3) // 256) * 256
    config = T.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
                           use_cache=False, attention_dropout=0.0, tie_word_embeddings=False)
    return _logits_only(T.LlamaForCausalLM)(config)


def bert_base4(num_classes: int = 2, layers: int = 4, vocab_size: int = 30522, hidden: int = 768,
               heads: int = 12, intermediate: int = 3072, max_positions: int = 512) -> Any:
    """BERT-base's widths (768, 12 heads, FFN 3072, 30,522-token vocabulary, 512 positions) at 4 of its 12
    layers, with a `num_classes`-way sequence classification head on the pooled [CLS] output (52 M
    parameters, 23 M of them the word embeddings)."""
    T = _transformers()
    config = T.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=intermediate,
                          max_position_embeddings=max_positions, num_labels=num_classes,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return _logits_only(T.BertForSequenceClassification)(config)


@functools.cache
def _image_logits(cls: type) -> type:
    """A subclass of the transformers image model class `cls` whose forward takes pixels and returns the logits."""

    class LogitsOnly(cls):  # type: ignore[valid-type, misc]
        def forward(self, pixel_values: Any) -> Any:
            return super().forward(pixel_values=pixel_values).logits

    LogitsOnly.__name__ = LogitsOnly.__qualname__ = cls.__name__
    return LogitsOnly


def vit_tiny(num_classes: int = 10, image_size: int = 32, patch_size: int = 8, hidden: int = 64, layers: int = 2,
             heads: int = 4, intermediate: int = 128, channels: int = 3) -> Any:
    """A tiny ViT image classifier (transformers' ViTForImageClassification): 32x32 images cut into 16
    patches of 8x8, a [CLS] token, 2 layers of width 64 with 4 heads, the head on the [CLS] output
    (0.1 M parameters)."""
    T = _transformers()
    config = T.ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=channels, hidden_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
                         num_labels=num_classes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _image_logits(T.ViTForImageClassification)(config)


# Default inputs, read by models.ZOO: token ids of (batch, sequence); images (batch, channels, height, width).
for _builder in (llama_small, bert_base4):
    _builder.default_input_shape = (4, 128)  # type: ignore[attr-defined]
    _builder.default_input_dtype = "int64"  # type: ignore[attr-defined]
vit_tiny.default_input_shape = (4, 3, 32, 32)  # type: ignore[attr-defined]
