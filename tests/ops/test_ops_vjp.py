"""Every VJP rule against torch.autograd, through the emitted ONNX run by onnxruntime.

One table of (name, function, input shapes, input domain) drives one parametrized check; conv and
pooling cases live in test_ops_conv_pool.py. Random shapes come from a seeded generator per case.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pockprop.autodiff.gradcheck import check_vjp
from pockprop.ops.registry import Need


_mean, _var = torch.randn(6), torch.rand(6) + 0.5


def _bn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, _mean[: x.shape[1]], _var[: x.shape[1]], w, b, False, 0.1, 1e-5)


# name, fn, shapes, domain ("any" | "pos" = away from 0 | "wide" = spans activation kinks)
CASES: list[tuple[str, Callable[..., torch.Tensor], list[tuple[int, ...]], str]] = [
    ("add_broadcast", lambda a, b: a + b, [(3, 4, 5), (4, 1)], "any"),
    ("sub_broadcast", lambda a, b: a - b, [(2, 1, 5), (3, 5)], "any"),
    ("mul_broadcast", lambda a, b: a * b, [(3, 4), (4,)], "any"),
    ("div_broadcast", lambda a, b: a / b, [(3, 4), (1, 4)], "pos"),
    ("scalar_ops", lambda a: (2.0 - a) * 3 + a / 4 - 1, [(5, 3)], "any"),
    ("neg_abs", lambda a: -a + a.abs(), [(4, 5)], "pos"),
    ("sqrt_exp_log", lambda a: a.sqrt() + a.log() + (a * 0.1).exp(), [(4, 5)], "pos"),
    ("pow", lambda a: a ** 3 + a.abs() ** 0.5, [(4, 5)], "pos"),
    ("relu", F.relu, [(4, 7)], "wide"),
    ("relu6", F.relu6, [(4, 7)], "wide"),
    ("hardtanh", lambda a: F.hardtanh(a, -2.0, 2.5), [(4, 7)], "wide"),
    ("clamp", lambda a: a.clamp(-1.0, 1.5) + a.clamp(min=0.5), [(4, 7)], "wide"),
    ("hardswish", F.hardswish, [(5, 7)], "wide"),
    ("hardsigmoid", F.hardsigmoid, [(5, 7)], "wide"),
    ("silu", F.silu, [(5, 7)], "wide"),
    ("gelu", F.gelu, [(5, 7)], "wide"),
    ("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), [(5, 7)], "wide"),
    ("sigmoid", torch.sigmoid, [(5, 7)], "wide"),
    ("tanh", torch.tanh, [(5, 7)], "wide"),
    ("linear", F.linear, [(4, 6), (5, 6), (5,)], "any"),
    ("linear_nobias", F.linear, [(4, 6), (5, 6)], "any"),
    ("linear_3d", F.linear, [(2, 3, 6), (5, 6), (5,)], "any"),
    ("mm", torch.mm, [(3, 4), (4, 5)], "any"),
    ("bmm", torch.bmm, [(2, 3, 4), (2, 4, 5)], "any"),
    ("matmul_broadcast", torch.matmul, [(2, 3, 4), (4, 5)], "any"),
    ("addmm", lambda b, x, w: torch.addmm(b, x, w, beta=0.5, alpha=2.0), [(5,), (3, 4), (4, 5)], "any"),
    ("sum_dims", lambda a: a.sum(dim=(1, 3)) + 0, [(2, 3, 4, 5)], "any"),
    ("sum_keepdim", lambda a: a.sum(dim=-1, keepdim=True) * a, [(3, 4)], "any"),
    ("sum_all", lambda a: a.sum() * a, [(3, 4)], "any"),
    ("mean_dims", lambda a: a.mean(dim=(2, 3)), [(2, 3, 4, 5)], "any"),
    ("mean_keepdim", lambda a: a.mean(dim=(-1, -2), keepdim=True) * a, [(2, 3, 4, 5)], "any"),
    ("view_flatten", lambda a: torch.flatten(a, 1).view(2, 3, -1), [(2, 3, 2, 2)], "any"),
    ("reshape", lambda a: a.reshape(6, 4).t(), [(2, 3, 4)], "any"),
    ("permute", lambda a: a.permute(2, 0, 3, 1), [(2, 3, 4, 5)], "any"),
    ("transpose", lambda a: a.transpose(-1, 1), [(2, 3, 4)], "any"),
    ("unsqueeze_squeeze", lambda a: a.unsqueeze(1).squeeze(1).unsqueeze(-1) * 2, [(3, 4)], "any"),
    ("expand", lambda a: a.expand(2, 3, 4), [(3, 1)], "any"),
    ("cat", lambda a, b: torch.cat([a, b, a], dim=1), [(2, 3, 4), (2, 2, 4)], "any"),
    ("slice", lambda a: a[:, 1:3] * a[:, :2], [(3, 5)], "any"),
    ("slice_strided", lambda a: a[:, ::2, 1::3], [(2, 5, 7)], "any"),
    ("select", lambda a: a[:, 1] + a[0], [(3, 3)], "any"),
    ("dropout_eval", lambda a: F.dropout(a, 0.5, training=False) * 2, [(3, 4)], "any"),
    ("batch_norm_2d", _bn, [(2, 6, 3, 3), (6,), (6,)], "any"),
    ("batch_norm_1d", _bn, [(5, 4), (4,), (4,)], "any"),
]


def _make(shape: tuple[int, ...], domain: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if domain == "pos":
        return x.abs() + 0.5
    if domain == "wide":
        return x * 4  # crosses the kinks of relu6/hardswish/hardsigmoid at -3, 0, 3, 6
    return x


@pytest.mark.parametrize("name,fn,shapes,domain", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_vjp_matches_torch(name: str, fn: Callable[..., torch.Tensor], shapes: list[tuple[int, ...]], domain: str,
                           seed: int) -> None:
    gen = torch.Generator().manual_seed(seed * 1000 + len(name))
    check_vjp(fn, *[_make(s, domain, gen) for s in shapes], seed=seed)


@pytest.mark.parametrize("axis,start,stop", [(1, 2, 5), (0, 1, 3)])
def test_linear_sliced_weight_grad(axis: int, start: int, stop: int) -> None:
    """A slice of the weight gradient equals the same slice of the full one, and is computed directly."""
    gen = torch.Generator().manual_seed(7)
    x, w, b = (torch.randn(s, generator=gen) for s in [(4, 6), (5, 6), (5,)])
    check_vjp(F.linear, x, w, b, needs={1: Need(axis, start, stop)})


def test_permute_sliced_grad() -> None:
    gen = torch.Generator().manual_seed(8)
    check_vjp(lambda a: a.permute(1, 0) * 3, torch.randn(4, 6, generator=gen), needs={0: Need(1, 1, 4)})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_loss(smoothing: float) -> None:
    _check_loss("cross_entropy", torch.randn(4, 5), torch.tensor([0, 3, 4, 1]),
                lambda z, t: F.cross_entropy(z, t, label_smoothing=smoothing), label_smoothing=smoothing)


def test_bce_with_logits_loss() -> None:
    _check_loss("bce_with_logits", torch.randn(4, 5) * 3, (torch.rand(4, 5) > 0.5).float(),
                F.binary_cross_entropy_with_logits)


def test_mse_loss() -> None:
    _check_loss("mse", torch.randn(3, 4), torch.randn(3, 4), F.mse_loss)


def _check_loss(op: str, z: torch.Tensor, t: torch.Tensor, ref: Callable[..., torch.Tensor], **attrs: float) -> None:
    """Losses are built by compile(), not traced: check the op directly on a hand-built graph."""
    from pockprop.autodiff.backward import backward
    from pockprop.emit.onnx import to_onnx
    from pockprop.autodiff.gradcheck import run_onnx
    from pockprop.ops.builder import Builder
    from pockprop.ir import Graph, TensorType
    from pockprop.ops.registry import FULL

    g = Graph()
    zv = g.add_input("z", TensorType(tuple(z.shape), "float32"))
    tv = g.add_input("t", TensorType(tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    loss = Builder(g).op(op, [zv, tv], **attrs)
    grads = backward(g, loss, {zv: FULL})
    g.outputs = [loss, grads[zv]]
    got_loss, got_grad = run_onnx(to_onnx(g), {"z": z.numpy(), "t": t.numpy()})
    zr = z.clone().requires_grad_(True)
    want = ref(zr, t)
    want.backward()
    np.testing.assert_allclose(got_loss, want.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_grad, zr.grad.numpy(), rtol=1e-4, atol=1e-6)
