"""Blocks found inside nested stacks (BERT's encoder.layer.N, Llama's model.layers.N, GPT-2's
transformer.h.N), and the presets over them, on toy modules shaped like the Hugging Face stacks.

The toy blocks use only ops with importers today (linear, matmul, tanh, a hand-written norm), so the
presets are also checked end to end against PyTorch with masked gradients.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pockprop.compiler.blocks import blocks, module_tree
from pockprop.compiler.compile import TracedModel, trace_model
from pockprop.compiler.scheme import resolve_scheme
from pockprop.errors import CompileError
from tests.compiler.torch_ref import assert_trains_like_torch

H, FF, T, CLASSES = 8, 16, 3, 3


class Norm(nn.Module):
    """A layer norm from supported ops (its parameters are used elementwise: an 'other' layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(H) + 0.1 * torch.randn(H)), nn.Parameter(torch.zeros(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x - x.mean(-1, keepdim=True)
        return c / torch.sqrt((c * c).mean(-1, keepdim=True) + 1e-5) * self.weight + self.bias


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(H, H) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.tanh(self.query(x) @ self.key(x).transpose(1, 2) / H ** 0.5)
        return self.out(scores @ self.value(x))


class Layer(nn.Module):
    """A pre-norm transformer block: attention, then the feed-forward network up -> down."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attention, self.norm2 = Norm(), Attention(), Norm()
        self.up, self.down = nn.Linear(H, FF), nn.Linear(FF, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.down(torch.tanh(self.up(self.norm2(x))))


class Encoder(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class Backbone(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.embeddings, self.encoder, self.pooler = nn.Linear(4, H), Encoder(n), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(self.encoder(self.embeddings(x))[:, 0]))


class BertLike(nn.Module):
    """bert.embeddings, bert.encoder.layer.N, bert.pooler, classifier."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.bert, self.classifier = Backbone(n), nn.Linear(H, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bert(x))


class Decoder(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.embed_tokens, self.layers, self.norm = nn.Linear(4, H), nn.ModuleList(Layer() for _ in range(n)), Norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaLike(nn.Module):
    """model.embed_tokens, model.layers.N, model.norm, lm_head (a sequence of logits, averaged here)."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.model, self.lm_head = Decoder(n), nn.Linear(H, CLASSES, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(x)).mean(1)


def _build(cls: type[nn.Module], **kw: int) -> nn.Module:
    torch.manual_seed(0)
    return cls(**kw)


def _names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(name for name, _ in blocks(module_tree(model))))


def test_blocks_of_nested_stacks() -> None:
    assert _names(BertLike(3)) == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1",
                                   "bert.encoder.layer.2", "bert.pooler+classifier"]
    assert _names(LlamaLike(1)) == ["model.embed_tokens", "model.layers.0", "model.norm+lm_head"]
    # a stack inside each element of a stack: the inner blocks count (hierarchical models, Swin's stages)
    stages = nn.ModuleList(Encoder(2) for _ in range(2))
    assert _names(stages) == ["0.layer.0", "0.layer.1", "1.layer.0", "1.layer.1"]
    # a Sequential of mixed layers is not a stack (a conv-bn pair): it stays one unit
    assert _names(nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))})) == ["a"]


def _batches(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(2, T, 4, generator=gen), torch.randint(0, CLASSES, (2,), generator=gen)) for _ in range(steps)]


@functools.cache
def _traced(cls: type[nn.Module]) -> TracedModel:
    return trace_model(_build(cls), (_batches()[0][0],))


def _trained(preset: str, cls: type[nn.Module] = BertLike) -> dict[str, str]:
    tm = _traced(cls)
    return {u.layer.path: u.kind for u in resolve_scheme(preset, tm.layers, tm.shapes).updates if u.kind != "frozen"}


def test_presets_count_the_stack() -> None:
    last = "bert.encoder.layer.3"
    assert _trained("last-k:1") == {f"{last}.{m}": "full" for m in ("norm1", "attention.query", "attention.key",
                                                                     "attention.value", "attention.out", "norm2",
                                                                     "up", "down")} | {"bert.pooler": "full",
                                                                                       "classifier": "full"}
    # blocks: the stem, 4 layers, and the head's block -> 6, in thirds of 2
    assert set(_trained("tbft-front")) == {"bert.embeddings", "classifier"} | {
        f"bert.encoder.layer.0.{m}" for m in ("norm1", "attention.query", "attention.key", "attention.value",
                                              "attention.out", "norm2", "up", "down")}
    with pytest.raises(CompileError, match="only 5 blocks"):
        _trained("last-k:6")


def test_transformer_sparse_preset() -> None:
    got = _trained("sparse")
    # the last half of the 5 blocks (layers 1-3): every bias; the last 4 blocks' FFN input layer sliced
    # (the stem counts as a block, so layer 0 gets the 1/8 slice); attention weights frozen; the head whole
    assert got["classifier"] == "full"
    assert got["bert.encoder.layer.0.up"] == "weight@0.125"
    assert [got[f"bert.encoder.layer.{i}.up"] for i in (1, 2, 3)] == ["weight@0.25+bias", "weight@0.25+bias",
                                                                      "weight@0.5+bias"]
    for i in (1, 2, 3):
        for m in ("attention.query", "attention.key", "attention.value", "attention.out", "down"):
            assert got[f"bert.encoder.layer.{i}.{m}"] == "bias"
    assert "bert.encoder.layer.0.attention.query" not in got and "bert.embeddings" not in got
    assert not any(k.endswith(("norm1", "norm2")) for k in got)  # 'other' layers have no bias to train
    # Llama's blocks: embed_tokens, layers.0, layers.1 (model.norm sits in the head's block and stays frozen)
    got = _trained("sparse", LlamaLike)
    assert (got["model.layers.0.up"], got["model.layers.1.up"], got["lm_head"]) == ("weight@0.25+bias",
                                                                                   "weight@0.5+bias", "full")
    assert "model.norm" not in got and "model.embed_tokens" not in got


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sparse", "last-k:1", "bias-only", "tbft-middle"])
def test_presets_on_a_transformer_train_like_torch(preset: str, tmp_path) -> None:
    opt = {"name": "sgd", "lr": 0.05, "momentum": 0.9}
    assert_trains_like_torch(lambda: _build(BertLike, n=2), _batches(), F.cross_entropy, opt, tmp_path, scheme=preset)


HF = {
    "bert": ("BertForSequenceClassification", "BertConfig", dict(hidden_size=16, num_attention_heads=2,
                                                                  intermediate_size=32), "bert.encoder.layer"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig", dict(dim=16, n_heads=2, hidden_dim=32),
                   "distilbert.transformer.layer"),
    "vit": ("ViTForImageClassification", "ViTConfig", dict(image_size=8, patch_size=4, hidden_size=16,
                                                          num_attention_heads=2, intermediate_size=32), None),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=16, n_head=2), "transformer.h"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                      num_key_value_heads=1), "model.layers"),
}


@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_stacks(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    cls, cfg_cls, kw, stack = HF[name]
    layers_key = {"distilbert": "n_layers", "gpt2": "n_layer"}.get(name, "num_hidden_layers")
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(vocab_size=32, **{layers_key: 3}, **kw))
    names = _names(model)
    if stack is None:  # the stack's path differs between transformers versions (vit.encoder.layer, vit.layers)
        stack = names[1].rsplit(".", 1)[0]
    assert names[1:4] == [f"{stack}.{i}" for i in range(3)]
    assert len(names) == 5  # stem, the 3 layers, the tail with the head
