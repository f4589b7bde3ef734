"""`--provider`: cpu by default; cuda where onnxruntime has it, else the CPU and one line saying so.

This machine's onnxruntime has no CUDA provider, so the fallback is what runs here; the list asked of
onnxruntime when CUDA *is* available is checked with onnxruntime's answer patched.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pockprop.cli import main
from pockprop.runtime import session as sessions
from pockprop.runtime.session import ProviderFallback, providers_for, session
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import dataset_npz

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def test_cpu_is_the_default_and_never_warns() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert providers_for() == providers_for("cpu") == [CPU]


def test_cuda_falls_back_to_the_cpu_with_a_warning(monkeypatch) -> None:
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: [CPU])
    with pytest.warns(ProviderFallback, match="no CUDAExecutionProvider .*onnxruntime-gpu.*: running on the CPU"):
        assert providers_for("cuda") == [CPU]


def test_cuda_is_asked_first_where_onnxruntime_has_it(monkeypatch) -> None:
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: [CUDA, CPU])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert providers_for("cuda") == [CUDA, CPU]


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown provider 'tpu'"):
        providers_for("tpu")


def test_a_session_that_cannot_start_cuda_says_so_and_runs_on_the_cpu(artifact) -> None:
    # onnxruntime lists CUDA (onnxruntime-gpu) but cannot start it (no CUDA libraries): here, CUDA is absent.
    model = str(artifact() / "infer.onnx")
    with pytest.warns(ProviderFallback, match="could not start CUDAExecutionProvider") as caught:
        sess = session(model, providers=[CUDA, CPU])
    assert sess.get_providers() == [CPU]
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) == 1  # not onnxruntime's own note too


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA: nothing falls back")
def test_trainer_on_cuda_falls_back_once_and_trains_like_the_cpu(artifact, tmp_path: Path) -> None:
    art = str(artifact())
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with pytest.warns(ProviderFallback) as caught:
        t = Trainer.load(art, provider="cuda")
        loss, pred = t.step(x, np.array([0, 1, 2, 0])), t.predict(x)  # builds the inference session too
    assert len([w for w in caught if issubclass(w.category, UserWarning)]) == 1 and t.providers == [CPU]
    ref = Trainer.load(art)
    assert loss == ref.step(x, np.array([0, 1, 2, 0])) and np.array_equal(pred, ref.predict(x))


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA: nothing falls back")
@pytest.mark.parametrize("command", ["train", "eval", "export", "inspect"])
def test_commands_take_provider_and_say_when_they_fall_back(artifact, tmp_path: Path, capsys, command: str) -> None:
    art, d = str(artifact()), str(dataset_npz(tmp_path / "d.npz"))
    extra = {"train": ["--data", d, "--no-progress"], "eval": ["--data", d], "export": ["-o", str(tmp_path / "m.onnx")],
             "inspect": []}[command]
    assert main([command, art, "--provider", "cuda", *extra]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "CUDA" in ln]
    assert notes == [f"pockprop {command}: warning: onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                     "(it comes with onnxruntime-gpu): running on the CPU"]


def test_an_unknown_provider_is_a_usage_error(artifact, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(artifact()), "--data", str(dataset_npz(tmp_path / "d.npz")), "--provider", "tpu"]) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
