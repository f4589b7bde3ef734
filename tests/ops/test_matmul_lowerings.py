"""matmul's two lowerings (ops/linear.py: "auto" MatMul, "gemm" Gemm) give torch's and the default's values.

Each case goes end to end through check_vjp (trace, VJP, a Chooser forcing "gemm" wherever a matmul offers
it, the emitter, onnxruntime), which asserts torch.autograd's values, and is compared with the default's.
linear's weight gradient (rows flattened) and input gradient are matmuls by a matrix, so its sliced needs
run through them.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from pockprop.autodiff.gradcheck import check_vjp, run_onnx
from pockprop.emit.onnx import to_onnx
from pockprop.ir import Graph, Node, TensorType
from pockprop.ops import get_op
from pockprop.ops.registry import LOWERING, Need


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gemm_everywhere(picked: list[str]):  # type: ignore[no-untyped-def]
    """A Chooser that picks "gemm" wherever a node offers it, recording each node it changed."""
    def choose(key, node, options, types):  # type: ignore[no-untyped-def]
        if "gemm" in options:
            picked.append(key)
            return "gemm"
        return options[0]
    return choose


def _same_as_default(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, **kw: Any) -> int:
    """check_vjp with "gemm" forced and with the default; asserts equal values; returns how many nodes used gemm."""
    picked: list[str] = []
    got = check_vjp(fn, *tensors, choose_lowering=_gemm_everywhere(picked), **kw)
    default = check_vjp(fn, *tensors, **kw)
    for a, b in zip(got.values, default.values):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    return len(picked)


@pytest.mark.parametrize("x_shape", [(3, 5, 6), (2, 7, 6), (1, 1, 6), (1, 6), (4, 6)])
def test_linear_weight_gradient(x_shape):  # type: ignore[no-untyped-def]
    """(batch, tokens, in) activations as a transformer's, plain rows, and a single row: dW and dx."""
    x, w, b = _randn(*x_shape, seed=1), _randn(4, 6, seed=2), _randn(4, seed=3)
    assert _same_as_default(lambda x, w, b: F.linear(x, w, b), x, w, b) >= 2


@pytest.mark.parametrize("need", [Need(1, 2, 5), Need(0, 1, 3), Need(1, 0, 1), Need(0, 3, 4)])
def test_linear_sliced_weight_need(need):  # type: ignore[no-untyped-def]
    """A sparse update's weight slice on either axis (input features slice x, output features slice g)."""
    x, w = _randn(2, 3, 6, seed=4), _randn(4, 6, seed=5)
    assert _same_as_default(lambda x, w: F.linear(x, w), x, w, needs={1: need}) >= 1


@pytest.mark.parametrize("need", [None, Need(0, 1, 4), Need(1, 2, 3)])
def test_conv1d_style_weight_in_out(need):  # type: ignore[no-untyped-def]
    """x @ W + b with W stored (in, out), as GPT-2's Conv1D: linear with weight_in_out, dW = x2^T g2."""
    x, w, b = _randn(2, 3, 5, seed=6), _randn(5, 4, seed=7), _randn(4, seed=8)
    fn = lambda x, w, b: torch.addmm(b, x.reshape(-1, 5), w).reshape(2, 3, 4)  # noqa: E731
    assert _same_as_default(fn, x, w, b, needs={1: need} if need else None) >= 1


def test_mm_both_operands():  # type: ignore[no-untyped-def]
    """a @ b of two matrices: both cotangent products are matrix products, so both take "gemm"."""
    assert _same_as_default(lambda a, b: a @ b, _randn(5, 3, seed=9), _randn(3, 4, seed=10)) >= 3


def test_batches_of_matrices_keep_matmul():  # type: ignore[no-untyped-def]
    """A batched right operand (attention's products) offers no choice; a matrix on the right does."""
    graph = Graph()
    graph.add_input("a", TensorType((2, 3, 4), "float32"))
    graph.add_input("b", TensorType((2, 4, 5), "float32"))
    graph.add_value("out", TensorType((2, 3, 5), "float32"))
    node = Node("matmul", ("a", "b"), ("out",), {})
    assert get_op("matmul").lowering_options(graph.types, node) == ()
    graph.types["b"] = TensorType((4, 5), "float32")
    assert get_op("matmul").lowering_options(graph.types, node) == ("auto", "gemm")


@pytest.mark.parametrize("a_shape,ops", [((3, 4), ["Gemm"]), ((2, 1, 3, 4), ["Reshape", "Gemm", "Reshape"])])
def test_gemm_lowering(a_shape, ops):  # type: ignore[no-untyped-def]
    """One Gemm; leading axes flattened into rows around it; values equal numpy's product."""
    graph = Graph()
    graph.add_input("a", TensorType(a_shape, "float32"))
    graph.add_input("b", TensorType((4, 5), "float32"))
    graph.add_value("out", TensorType(a_shape[:-1] + (5,), "float32"))
    graph.append(Node("matmul", ("a", "b"), ("out",), {LOWERING: "gemm"}))
    graph.outputs = ["out"]
    model = to_onnx(graph)
    assert [n.op_type for n in model.graph.node] == ops
    onnx.checker.check_model(model, full_check=True)
    a, b = np.random.default_rng(0).standard_normal(a_shape, np.float32), np.ones((4, 5), np.float32)
    np.testing.assert_allclose(run_onnx(model, {"a": a, "b": b})[0], a @ b, rtol=1e-5, atol=1e-6)
