"""pockprop's model zoo: small, self-contained PyTorch definitions.

No downloads and no torchvision: every network is defined here (the CNNs and
the MLP, built from Conv2d incl. depthwise, BatchNorm2d, Linear, ReLU/ReLU6,
Dropout, MaxPool2d, AdaptiveAvgPool2d, add, flatten) or built from a
transformers config (``hf.py``: the Llama-shaped LM and the BERT-base-shaped
classifier, token ids in; transformers is imported only when one is built),
randomly initialised. Activations are out-of-place (unlike
torchvision's ``inplace=True``): the exported graph then holds functional
``aten.relu`` / ``aten.hardtanh`` rather than ``relu_`` / ``hardtanh_``, which
the training-graph compiler need not special-case. Module names, parameters
and state dicts are unaffected.

Public API:

* builders ``mobilenet_v2``, ``resnet18``, ``resnet26``, ``resnet50``,
  ``mcunet``, ``mlp``, ``bert_base4`` -- all accept ``num_classes`` -- and
  ``llama_small`` (its classes are its vocabulary: ``vocab_size``);
* ``ZOO``: name -> :class:`ModelInfo` (builder, default input shape and dtype, description);
* specs (``"models:NAME"``) are resolved by :mod:`pockprop.tracing.loader`,
  which looks names up in ``ZOO`` only;
* :mod:`models.data`: the offline digits dataset (numpy + scikit-learn).

Files: ``mobilenetv2.py``, ``resnet.py`` (ResNet-18/26/50),
``proxyless.py`` (MCUNet-style CNN), ``perceptron.py`` (MLP), ``hf.py``
(transformers), ``data.py``.

Builders and ``ZOO`` are loaded lazily (PEP 562) so that ``import
models.data`` does not import torch: the data helpers must also work on a
device that only has the numpy/onnxruntime runtime installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from pockprop.models.mobilenetv2 import mobilenet_v2
    from pockprop.models.perceptron import mlp
    from pockprop.models.proxyless import mcunet
    from pockprop.models.resnet import resnet18, resnet26, resnet50
    from pockprop.models.hf import bert_base4, llama_small, vit_tiny

__all__ = ["ModelInfo", "ZOO",
           "mobilenet_v2", "resnet18", "resnet26", "resnet50", "mcunet", "mlp", "llama_small", "bert_base4",
           "vit_tiny"]

# Zoo name -> (submodule, one-line description). The builder in each submodule
# carries its own ``default_input_shape``, so shapes live next to the model.
# No submodule shares a builder's name (torchvision's mobilenetv2.py precedent):
# importing a submodule sets it as a package attribute, which would otherwise
# replace the builder function of the same name.
_ENTRIES: dict[str, tuple[str, str]] = {
    "mobilenet_v2": ("mobilenetv2", "MobileNetV2, torchvision layout and names (3.5M params)"),
    "resnet18": ("resnet", "ResNet-18, BasicBlock [2,2,2,2], torchvision names (11.7M params)"),
    "resnet26": ("resnet", "ResNet-26, Bottleneck [2,2,2,2], torchvision names (16.0M params)"),
    "resnet50": ("resnet", "ResNet-50, Bottleneck [3,4,6,3], torchvision names (25.6M params)"),
    "mcunet": ("proxyless", "MCUNet/ProxylessNAS-style mobile CNN, mixed kernels (0.97M params)"),
    "mlp": ("perceptron", "Multi-layer perceptron for 64-feature inputs (digits_flat)"),
    "llama_small": ("hf", "Llama-shaped causal LM, transformers' LlamaForCausalLM: 8 layers, width 256, "
                          "vocabulary 2,048 (7.9M params); token ids in"),
    "bert_base4": ("hf", "BERT-base-shaped classifier, transformers' BertForSequenceClassification at 4 of "
                         "BERT-base's 12 layers (52M params); token ids in"),
    "vit_tiny": ("hf", "Tiny ViT image classifier, transformers' ViTForImageClassification: 32x32 images, 8x8 "
                       "patches, 2 layers of width 64 (0.1M params)"),
}


@dataclass(frozen=True)
class ModelInfo:
    """One zoo entry. ``input_shape`` is the default full input shape, batch first; ``input_dtype`` its
    dtype: float32 (images, features) or int64 (token ids)."""

    name: str
    builder: Callable[..., Any]
    input_shape: tuple[int, ...]
    description: str
    input_dtype: str = "float32"


def _builder(name: str) -> Callable[..., Any]:
    module = importlib.import_module(f"{__name__}.{_ENTRIES[name][0]}")
    return getattr(module, name)


def _build_zoo() -> dict[str, ModelInfo]:
    zoo = {}
    for name, (_, description) in _ENTRIES.items():
        builder = _builder(name)
        zoo[name] = ModelInfo(name, builder, tuple(builder.default_input_shape), description,
                              getattr(builder, "default_input_dtype", "float32"))
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
