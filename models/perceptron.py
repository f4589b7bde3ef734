"""A plain multi-layer perceptron, the smallest model in the zoo.

Useful as the fastest end-to-end check of the compiler and as the model for
the flattened 8x8 digits data (:func:`models.data.digits_flat`, 64 features).

``layers`` is one Sequential: ``Linear, ReLU, [Dropout,]`` per hidden layer,
then the output ``Linear``. Inputs of shape (N, in_features) or
(N, C, H, W) with C*H*W == in_features are accepted; forward always calls
``torch.flatten(x, 1)``, which is a no-op on 2-D input, so the exported graph
has no data-dependent branch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Linear/ReLU stack with an optional Dropout after every hidden activation."""

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (128, 64),
                 num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"layer sizes must be positive: in_features={in_features}, "
                             f"hidden={tuple(hidden)}, num_classes={num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            # Dropout(0) would be a no-op node in the graph; leave it out instead.
            if dropout > 0:
                layers.append(nn.Dropout(p=dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


def mlp(in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10,
        dropout: float = 0.0) -> MLP:
    """Build a randomly initialised MLP (PyTorch default Linear init)."""
    return MLP(in_features=in_features, hidden=hidden, num_classes=num_classes, dropout=dropout)


# Default full input shape (batch first), read by models.ZOO.
mlp.default_input_shape = (8, 64)  # type: ignore[attr-defined]
