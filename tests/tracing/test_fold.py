"""Trace-time folding: what does not depend on the inputs or parameters becomes constants, nothing else.

The toy modules use ops that have no importer (arange, cumsum, cos, sin, split, index) only where their
values are constants of the model, which is how transformers build rotary tables, position ids and masks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from pockprop.errors import UnsupportedOpError
from pockprop.tracing.trace import trace


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Rotary(nn.Module):
    """Llama's rotary embedding in miniature: a buffer of inverse frequencies, positions from arange and
    cumsum, cos/sin tables, then a linear layer on the rotated input."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, dim)
        t = x.shape[1]
        pos = torch.cumsum(torch.ones(t, dtype=torch.long), 0) - 1  # 0..T-1, as HF builds position ids
        freqs = torch.outer(pos.float(), self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None], emb.sin()[None]
        return self.fc(x * cos + _rotate_half(x) * sin).mean(1)


def test_rotary_table_folds_and_matches_torch() -> None:
    torch.manual_seed(0)
    model = Rotary()
    x = torch.randn(2, 5, 8)
    traced = trace(model, (x,))
    g = traced.graph
    assert not {n.op for n in g.nodes} & {"cos", "sin", "cumsum", "arange"}
    assert "inv_freq" not in g.constants  # read only by folded nodes
    assert traced.buffers == ["inv_freq"]
    tables = [c for c in g.constants if g.constants[c].shape == (1, 5, 8)]
    assert len(tables) == 2  # cos and sin, each one constant for all its readers

    from pockprop.autodiff.gradcheck import run_onnx
    from pockprop.emit.onnx import to_onnx

    with torch.no_grad():
        want = model(x).numpy()
    got = run_onnx(to_onnx(g, "rotary"), {traced.user_inputs[0]: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class Split(nn.Module):
    """A multi-output op (split) and an index over a buffer: folded through getitem."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(12.0).reshape(6, 2))
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.split(self.table, [2, 4])
        rows = hi[torch.tensor([3, 0])]
        return self.fc(x) + lo + rows


def test_multi_output_and_index_fold() -> None:
    traced = trace(Split(), (torch.randn(2, 2),))
    assert [n.op for n in traced.graph.nodes].count("add") == 2
    assert not any("split" in n.op or "index" in n.op for n in traced.graph.nodes)


class Dependent(nn.Module):
    """cos of a parameter and cumsum of the input: both must stay in the graph (neither is a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, 1) * torch.cos(self.w) + torch.sin(torch.arange(4.0))


def test_parameters_and_inputs_are_never_folded() -> None:
    ops = [n.op for n in trace(Dependent(), (torch.randn(2, 4),)).graph.nodes]
    assert "cumsum" in ops and "cos" in ops and "sin" not in ops  # sin(arange) folded


class Random(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand(4)


def test_random_ops_are_not_constants() -> None:
    with pytest.raises(UnsupportedOpError, match="aten.rand"):
        trace(Random(), (torch.randn(2, 4),))


class Broadcast(nn.Module):
    """A small buffer expanded to an activation-sized tensor: the expand must stay in the graph."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.register_buffer("row", torch.randn(1, d))
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.row.expand(self.n, -1).exp()


@pytest.mark.parametrize("n,folded", [(4, True), (256, False)])
def test_size_bound(n: int, folded: bool) -> None:
    d = 128  # (256, 128) float32 is 128 KiB, over the 64 KiB bound; (4, 128) is 2 KiB
    traced = trace(Broadcast(n, d), (torch.randn(n, d),))
    ops = [node.op for node in traced.graph.nodes]
    assert ops == (["mul"] if folded else ["expand", "exp", "mul"])
    assert max(a.nbytes for a in traced.graph.constants.values()) <= 64 * 1024
