"""pockprop's model zoo: small, self-contained PyTorch definitions.

No downloads and no torchvision: every network is defined here, randomly
initialised, and built only from ops the compiler supports (Conv2d incl.
depthwise, BatchNorm2d, Linear, ReLU/ReLU6, Dropout, MaxPool2d,
AdaptiveAvgPool2d, add, flatten). Activations are out-of-place (unlike
torchvision's ``inplace=True``): the exported graph then holds functional
``aten.relu`` / ``aten.hardtanh`` rather than ``relu_`` / ``hardtanh_``, which
the training-graph compiler need not special-case. Module names, parameters
and state dicts are unaffected.

Public API:

* builders ``mobilenet_v2``, ``resnet18``, ``resnet26``, ``resnet50``,
  ``mcunet``, ``mlp`` -- all accept ``num_classes``;
* ``ZOO``: name -> :class:`ModelInfo` (builder, default input shape, description);
* :func:`resolve`: turn a ``"models:NAME"`` or ``"package.module:function"``
  spec into ``(model, default_input_shape)``;
* :mod:`models.data`: the offline digits dataset (numpy + scikit-learn).

Files: ``mobilenetv2.py``, ``resnet.py`` (ResNet-18/26/50),
``proxyless.py`` (MCUNet-style CNN), ``perceptron.py`` (MLP), ``data.py``.

Builders and ``ZOO`` are loaded lazily (PEP 562) so that ``import
models.data`` does not import torch: the data helpers must also work on a
device that only has the numpy/onnxruntime runtime installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from torch import nn

    from pockprop.models.mobilenetv2 import mobilenet_v2
    from pockprop.models.perceptron import mlp
    from pockprop.models.proxyless import mcunet
    from pockprop.models.resnet import resnet18, resnet26, resnet50

__all__ = ["ModelInfo", "ZOO", "resolve",
           "mobilenet_v2", "resnet18", "resnet26", "resnet50", "mcunet", "mlp"]

ZOO_PREFIX = "models"

# Zoo name -> (submodule, one-line description). The builder in each submodule
# carries its own ``default_input_shape``, so shapes live next to the model.
# No submodule shares a builder's name (torchvision's mobilenetv2.py precedent):
# importing a submodule sets it as a package attribute, which would otherwise
# replace the builder function that ``models:NAME`` specs rely on.
_ENTRIES: dict[str, tuple[str, str]] = {
    "mobilenet_v2": ("mobilenetv2", "MobileNetV2, torchvision layout and names (3.5M params)"),
    "resnet18": ("resnet", "ResNet-18, BasicBlock [2,2,2,2], torchvision names (11.7M params)"),
    "resnet26": ("resnet", "ResNet-26, Bottleneck [2,2,2,2], torchvision names (16.0M params)"),
    "resnet50": ("resnet", "ResNet-50, Bottleneck [3,4,6,3], torchvision names (25.6M params)"),
    "mcunet": ("proxyless", "MCUNet/ProxylessNAS-style mobile CNN, mixed kernels (0.97M params)"),
    "mlp": ("perceptron", "Multi-layer perceptron for 64-feature inputs (digits_flat)"),
}


@dataclass(frozen=True)
class ModelInfo:
    """One zoo entry. ``input_shape`` is the default full input shape, batch first."""

    name: str
    builder: Callable[..., Any]
    input_shape: tuple[int, ...]
    description: str


def _builder(name: str) -> Callable[..., Any]:
    module = importlib.import_module(f"{__name__}.{_ENTRIES[name][0]}")
    return getattr(module, name)


def _build_zoo() -> dict[str, ModelInfo]:
    zoo = {}
    for name, (_, description) in _ENTRIES.items():
        builder = _builder(name)
        zoo[name] = ModelInfo(name, builder, tuple(builder.default_input_shape), description)
    return zoo


def __getattr__(name: str) -> Any:
    # Only called for names not yet in globals(); cache so each loads once.
    if name in _ENTRIES:
        value = _builder(name)
    elif name == "ZOO":
        value = _build_zoo()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _split_spec(spec: str) -> tuple[str, str]:
    """Validate ``"package.module:function"`` and return its two halves."""
    parts = spec.split(":") if isinstance(spec, str) else []
    if (len(parts) != 2
            or not all(p.isidentifier() for p in parts[0].split("."))
            or not parts[1].isidentifier()):
        raise ValueError(
            f"malformed model spec {spec!r}: must be 'module:function' "
            f"(e.g. 'models:mobilenet_v2' or 'mypkg.nets:build')")
    return parts[0], parts[1]


def _shape_or_none(shape: Any, where: str) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{where}.default_input_shape must be a sequence of ints, "
                         f"got {shape!r}") from None


def resolve(spec: str, **kwargs: Any) -> tuple["nn.Module", tuple[int, ...] | None]:
    """Build the model named by ``spec`` and return it with its default input shape.

    ``"models:NAME"`` looks NAME up in :data:`ZOO`. Any other
    ``"package.module:function"`` imports the module and calls the function;
    its default shape is the function's ``default_input_shape`` attribute if
    it has one, else ``None``. ``kwargs`` are passed to the builder.

    When the default shape is 2-D (batch, features) and the model reports an
    integer ``in_features`` (our MLP, a bare ``nn.Linear``), the feature size
    is taken from the model, so ``resolve("models:mlp", in_features=32)``
    yields shape (8, 32) rather than a stale (8, 64).

    Raises ``ValueError`` for an unknown zoo name, a malformed spec, an
    unimportable module, a missing or non-callable attribute, or a builder
    that does not return an ``nn.Module``.
    """
    module_name, func_name = _split_spec(spec)
    if module_name == ZOO_PREFIX:
        if func_name not in _ENTRIES:
            raise ValueError(f"unknown zoo model {func_name!r} in spec {spec!r}; "
                             f"known models: {', '.join(sorted(_ENTRIES))}")
        info = __getattr__("ZOO")[func_name]
        builder, shape = info.builder, info.input_shape
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import module {module_name!r} for spec {spec!r}: {exc}") from exc
        if not hasattr(module, func_name):
            raise ValueError(f"module {module_name!r} has no attribute {func_name!r} (spec {spec!r})")
        builder = getattr(module, func_name)
        if not callable(builder):
            raise ValueError(f"{spec!r} is not callable: got {type(builder).__name__}")
        shape = _shape_or_none(getattr(builder, "default_input_shape", None), spec)

    from torch import nn

    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    in_features = getattr(model, "in_features", None)
    if shape is not None and len(shape) == 2 and isinstance(in_features, int):
        shape = (shape[0], in_features)
    return model, shape
