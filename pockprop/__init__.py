"""pockprop: compile-ahead sparse training for edge devices.

    from pockprop import compile, Trainer          # compile needs the [compile] extra (torch)
    art = compile(model, (x,), scheme="sparse")
    art.save("out/model")
    trainer = Trainer.load("out/model")             # numpy + onnxruntime only

The stage folders of the repository (ir, ops, tracing, autodiff, passes, emit, compiler, artifact,
runtime, search, bench, models) are the subpackages `pockprop.<stage>`; pyproject.toml maps them in. The
public names below load on first use, so `import pockprop` never imports torch.
"""
from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# In a source checkout the stage folders sit beside this one, at the top of the repository; make them
# importable as subpackages without an install (an installed wheel has them inside this folder).
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_REPO, "pyproject.toml")) and os.path.isdir(os.path.join(_REPO, "ir")):
    __path__.append(_REPO)  # type: ignore[name-defined]  # noqa: F821

_LAZY = {
    "compile": ("pockprop.compiler.compile", "compile"),
    "trace_model": ("pockprop.compiler.compile", "trace_model"),
    "compile_traced": ("pockprop.compiler.compile", "compile_traced"),
    "Artifact": ("pockprop.compiler.artifact", "Artifact"),
    "Trainer": ("pockprop.runtime.trainer", "Trainer"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pockprop' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
