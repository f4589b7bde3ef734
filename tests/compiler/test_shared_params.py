"""Shared parameters (weight tying): one tensor, one state entry, one update with the summed gradient.

torch.export lists a tied parameter under each of its names; the compiled step must train it exactly
as PyTorch does, where the tensor is one `nn.Parameter` whose gradient sums every use.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pockprop.compiler.compile import trace_model
from tests.compiler.torch_ref import assert_trains_like_torch

OPTIMIZERS = [{"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
              {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01, "eps": 1e-5}]


class TwoLinears(nn.Module):
    """Two Linear modules holding one weight (`b.weight = a.weight`)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Lookup(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, dim) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # soft one-hot rows -> embeddings
        return x @ self.weight


class TiedHead(nn.Module):
    """GPT-2's tying: the input embedding's weight is the LM head's weight."""

    def __init__(self, vocab: int = 7, dim: int = 5) -> None:
        super().__init__()
        self.emb = Lookup(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))))


class Functional(nn.Module):
    """One parameter read twice through F.linear (no second name at all)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x, self.fc.weight, self.fc.bias))
        return self.out(F.linear(h, self.fc.weight))


MODELS = {"two_linears": (TwoLinears, 6, 4), "tied_head": (TiedHead, 7, 7), "functional": (Functional, 6, 4)}


def _batches(d_in: int, classes: int, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.softmax(torch.randn(4, d_in, generator=gen), 1), torch.randint(0, classes, (4,), generator=gen))
            for _ in range(steps)]


def _build(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls()


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["name"])
@pytest.mark.parametrize("name", list(MODELS))
def test_shared_parameter_trains_like_torch(name: str, opt: dict, tmp_path) -> None:  # type: ignore[type-arg]
    cls, d_in, classes = MODELS[name]
    art = assert_trains_like_torch(lambda: _build(cls), _batches(d_in, classes), F.cross_entropy, opt, tmp_path)
    names = [s.name for s in art.state if s.role == "param"]
    assert names == [n for n, _ in _build(cls).named_parameters()]  # one entry per tensor, torch's names


def test_a_pattern_may_name_either_name(tmp_path) -> None:
    art = assert_trains_like_torch(lambda: _build(TiedHead), _batches(7, 7), F.cross_entropy, OPTIMIZERS[0], tmp_path,
                                   trainable="head.*")
    assert art.trainable == ["emb.weight"]


def test_layers_of_a_shared_weight_and_the_head_preset(tmp_path) -> None:
    tm = trace_model(_build(TiedHead), (_batches(7, 7)[0][0],))
    assert tm.traced.parameters == ["emb.weight", "mix.weight", "mix.bias"]
    assert tm.traced.aliases == {"head.weight": "emb.weight"}
    layers = {l.path: l for l in tm.layers}
    assert layers["head"].op == "linear" and layers["head"].weight == "emb.weight"  # the use inside `head`
    assert layers["emb"].op == "other" and layers["emb"].params == ["emb.weight"]
    art = assert_trains_like_torch(lambda: _build(TiedHead), _batches(7, 7), F.cross_entropy, OPTIMIZERS[0], tmp_path,
                                   scheme="classifier")
    assert art.trainable == ["emb.weight"]
