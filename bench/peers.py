"""The peers' interpreters of `pockprop bench`: which one (option, environment variable, the venv `make peers`
builds in the current folder) and whether it works. Stdlib only.

onnxruntime-training 1.19.2 needs numpy < 2 (and conflicts with onnxruntime); executorch 1.5.1 needs numpy >= 2:
each has its own venv, .venv-peers and .venv-et.
"""
from __future__ import annotations

import os
import subprocess
from typing import Any

PEERS_ENV = "POCKPROP_PEERS_PYTHON"
ET_ENV = "POCKPROP_ET_PYTHON"


def _venv_python(given: str | None, env: str, venv: str) -> str:
    return os.path.abspath(given or os.environ.get(env) or os.path.join(venv, "bin", "python"))


def peers_python(given: str | None = None) -> str:
    """--peers-python, else $POCKPROP_PEERS_PYTHON, else .venv-peers/bin/python of the current folder."""
    return _venv_python(given, PEERS_ENV, ".venv-peers")


def et_python(given: str | None = None) -> str:
    """--et-python, else $POCKPROP_ET_PYTHON, else .venv-et/bin/python of the current folder."""
    return _venv_python(given, ET_ENV, ".venv-et")


def _status(python: str, code: str, what: str, option: str, env: str) -> str | None:
    """None when `code` runs under `python`, else why not (and how to get a working one)."""
    if not os.path.exists(python):
        return (f"no {python}: run `make peers` in a pockprop checkout to build the {what} venv, "
                f"or name one with {option} (or ${env})")
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as ex:
        return f"{python} does not run: {ex}"
    if r.returncode != 0:
        return f"{what} does not import in {python}: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def peers_status(python: str | None = None) -> str | None:
    """None when the onnxruntime-training interpreter (default: peers_python()) works, else why not."""
    return _status(python or peers_python(), "import onnxruntime.training.api, onnxruntime.training.artifacts",
                   "onnxruntime-training", "--peers-python", PEERS_ENV)


def et_status(python: str | None = None) -> str | None:
    """None when executorch's training API imports under the ExecuTorch interpreter (default: et_python())."""
    code = ("import executorch.extension.training, executorch.exir; "
            "from torch.export.experimental import _export_forward_backward")
    return _status(python or et_python(), code, "executorch's training API", "--et-python", ET_ENV)


def et_train_skip(optimizer: dict[str, Any]) -> str | None:
    """Why the ExecuTorch rows cannot run this optimizer (None: they can). Its only optimizer is SGD."""
    if optimizer.get("name") != "sgd":
        return f"ExecuTorch training has no {optimizer.get('name')} optimizer (SGD only)"
    return None
