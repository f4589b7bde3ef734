"""Cross-entropy over sequences: (N, T, V) logits, labels at -100 ignored, mean over the counted labels,
exactly as torch computes it (Hugging Face flattens to (N*T, V) and relies on ignore_index=-100)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.ops.test_ops_vjp import _check_loss


def _labels(shape: tuple[int, ...], classes: int, ignored: str, gen: torch.Generator) -> torch.Tensor:
    y = torch.randint(0, classes, shape, generator=gen)
    if ignored == "some":
        y[..., -2:] = -100  # padding at the end of each sequence (or of the batch)
        y.view(-1)[0] = -100
    elif ignored == "all":
        y[:] = -100
    return y


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 6), (1, 1, 2)], ids=["N,C", "N,T,V", "1,1,V"])
def test_cross_entropy_matches_torch(shape: tuple[int, ...], ignored: str, smoothing: float) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 10 + int(smoothing * 10))
    z = torch.randn(shape, generator=gen) * 2
    y = _labels(shape[:-1], shape[-1], ignored, gen)

    def ref(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), label_smoothing=smoothing)

    _check_loss("cross_entropy", z, y, ref, label_smoothing=smoothing)
    if ignored == "all":  # torch's convention, kept: the loss is NaN (the runtime guard rejects the step)
        assert np.isnan(ref(z, y).item())  # and the gradient is zero (checked above against torch's)


@pytest.mark.parametrize("shape,pos_weight", [((4, 5), [0.5, 2.0, 1.0, 3.0, 0.0]), ((4, 5), [2.5]),
                                              ((1, 1), [4.0]), ((2, 3, 4), [1.0, 2.0, 0.5, 7.0])],
                         ids=["per-label", "scalar", "1x1", "N,T,L"])
def test_bce_pos_weight_matches_torch(shape: tuple[int, ...], pos_weight: list[float]) -> None:
    """BCEWithLogitsLoss(pos_weight=...) through onnxruntime: the loss and the hand-derived gradient,
    large logits included (the stable form must not overflow)."""
    gen = torch.Generator().manual_seed(len(shape) + len(pos_weight))
    z = torch.randn(shape, generator=gen) * 4
    z.view(-1)[0] = 60.0  # far into sigmoid's flat parts, both signs
    z.view(-1)[-1] = -60.0
    t = (torch.rand(shape, generator=gen) > 0.5).float()
    pw = torch.tensor(pos_weight)
    _check_loss("bce_with_logits", z, t, lambda z, t: F.binary_cross_entropy_with_logits(z, t, pos_weight=pw),
                pos_weight=tuple(pos_weight))


def test_bce_pos_weight_checked() -> None:
    from pockprop.errors import CompileError
    from pockprop.ops.loss import pos_weight_shape

    assert pos_weight_shape(2, 3) == (2.0,)
    assert pos_weight_shape([1, 2, 3], 3) == (1.0, 2.0, 3.0)
    for bad, says in [([1, 2], "2 values"), ([-1.0], ">= 0"), ([float("nan")], ">= 0"), ([float("inf")], ">= 0")]:
        with pytest.raises(CompileError, match=says):
            pos_weight_shape(bad, 3)
