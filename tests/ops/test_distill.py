"""The distillation terms (ops/distill.py) against torch.autograd, through onnxruntime: the softmax form
against torch's F.kl_div(..., reduction="batchmean") * T^2 (over the counted rows), the sigmoid form
against the binary KL written with torch's log-sigmoid; edge shapes and temperatures included."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pockprop.autodiff.backward import backward
from pockprop.autodiff.gradcheck import run_onnx
from pockprop.emit.onnx import to_onnx
from pockprop.ir import Graph, TensorType
from pockprop.ops.builder import Builder
from pockprop.ops.registry import FULL
from tests.ops.test_loss import _labels


def softmax_kd(z: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """torch's KD term: batchmean KL over the rows whose label is not -100 (all rows: exactly batchmean)."""
    keep = y.reshape(-1) != -100
    zs, zts = z.reshape(-1, z.shape[-1])[keep], zt.reshape(-1, zt.shape[-1])[keep]
    kl = F.kl_div(F.log_softmax(zs / temperature, -1), F.softmax(zts / temperature, -1), reduction="batchmean")
    return kl * temperature ** 2


def sigmoid_kd(z: torch.Tensor, zt: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 mean over elements of KL(Bernoulli(sigmoid(z_t/T)) || Bernoulli(sigmoid(z/T)))."""
    a, s = zt / temperature, z / temperature
    q = torch.sigmoid(a)
    kl = q * (F.logsigmoid(a) - F.logsigmoid(s)) + (1 - q) * (F.logsigmoid(-a) - F.logsigmoid(-s))
    return kl.mean() * temperature ** 2


def _run(op: str, inputs: dict[str, torch.Tensor], **attrs: float) -> tuple[np.ndarray, np.ndarray]:
    """(loss, gradient wrt z) of `op` over inputs (z first) on a hand-built graph, through onnxruntime."""
    g = Graph()
    names = [g.add_input(k, TensorType(tuple(v.shape), str(v.dtype).removeprefix("torch."))) for k, v in inputs.items()]
    loss = Builder(g).op(op, names, **attrs)
    grads = backward(g, loss, {names[0]: FULL})
    g.outputs = [loss, grads[names[0]]]
    got_loss, got_grad = run_onnx(to_onnx(g), {k: v.numpy() for k, v in inputs.items()})
    return got_loss, got_grad


def _compare(got: tuple[np.ndarray, np.ndarray], ref: torch.Tensor, z: torch.Tensor) -> None:
    ref.backward()
    np.testing.assert_allclose(got[0], ref.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], z.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 6), (1, 3), (1, 1, 2)], ids=["N,C", "N,T,V", "1,C", "1,1,V"])
def test_softmax_kd_matches_torch(shape: tuple[int, ...], ignored: str, temperature: float) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 10 + int(temperature * 3))
    z, zt = torch.randn(shape, generator=gen) * 2, torch.randn(shape, generator=gen) * 3
    y = _labels(shape[:-1], shape[-1], ignored if shape[0] > 1 or ignored != "some" else "none", gen)
    got = _run("kl_div_softmax", {"z": z, "zt": zt, "y": y}, temperature=temperature)
    zr = z.clone().requires_grad_(True)
    ref = softmax_kd(zr, zt, y, temperature)
    if ignored == "all":  # as cross_entropy: 0/0 = NaN, gradient 0
        assert np.isnan(got[0]) and np.isnan(ref.item())
        ref.backward()
        np.testing.assert_array_equal(got[1], 0.0)
        np.testing.assert_array_equal(zr.grad.numpy(), 0.0)
        return
    _compare(got, ref, zr)


def test_softmax_kd_is_torch_batchmean() -> None:
    """With no row ignored, the op is exactly F.kl_div(log_softmax(z/T), softmax(z_t/T), 'batchmean') * T^2."""
    gen = torch.Generator().manual_seed(3)
    z, zt = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    got = _run("kl_div_softmax", {"z": z, "zt": zt, "y": torch.zeros(6, dtype=torch.int64)}, temperature=3.0)
    want = F.kl_div(F.log_softmax(z / 3, -1), F.softmax(zt / 3, -1), reduction="batchmean") * 9
    np.testing.assert_allclose(got[0], want.item(), rtol=1e-5)


def test_softmax_kd_is_zero_against_itself() -> None:
    z = torch.randn(4, 7, generator=torch.Generator().manual_seed(5))
    loss, grad = _run("kl_div_softmax", {"z": z, "zt": z.clone(), "y": torch.zeros(4, dtype=torch.int64)},
                      temperature=2.0)
    assert abs(float(loss)) < 1e-6 and np.abs(grad).max() < 1e-7


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("shape", [(4, 5), (1, 3), (2, 3, 4)], ids=["N,L", "1,L", "N,T,L"])
def test_sigmoid_kd_matches_torch(shape: tuple[int, ...], temperature: float) -> None:
    gen = torch.Generator().manual_seed(len(shape) + int(temperature * 10))
    z, zt = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen) * 3
    got = _run("kl_div_sigmoid", {"z": z, "zt": zt}, temperature=temperature)
    zr = z.clone().requires_grad_(True)
    _compare(got, sigmoid_kd(zr, zt, temperature), zr)


def test_sigmoid_kd_stays_finite_for_large_logits() -> None:
    z = torch.tensor([[80.0, -80.0, 30.0]])
    zt = torch.tensor([[-90.0, 95.0, 30.0]])
    loss, grad = _run("kl_div_sigmoid", {"z": z, "zt": zt}, temperature=1.0)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, sigmoid_kd(z, zt, 1.0).item(), rtol=1e-5)


def test_teacher_shape_must_match() -> None:
    from pockprop.errors import CompileError

    g = Graph()
    z = g.add_input("z", TensorType((2, 3), "float32"))
    zt = g.add_input("zt", TensorType((2, 4), "float32"))
    with pytest.raises(CompileError, match="teacher logits"):
        Builder(g).op("kl_div_sigmoid", [z, zt], temperature=1.0)
