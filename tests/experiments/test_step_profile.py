"""experiments.step_profile: a step's kernel time by phase, op and node, read from onnxruntime's profiler."""
from __future__ import annotations

import torch

from experiments import step_profile
from pockprop.compiler.compile import compile
from pockprop.tracing import loader


def test_profile_attributes_kernel_time_to_phases(tmp_path, capsys):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model, _ = loader.resolve("models:mcunet", num_classes=3, width_mult=0.25)
    path = compile(model, torch.randn(2, 3, 32, 32), scheme="sparse").save(str(tmp_path / "a"))
    records = step_profile.profile(path, steps=2, threads=1)
    phases = {r["phase"] for r in records}
    assert {"forward", "backward", "optimizer"} <= phases
    assert all(r["ms"] >= 0 for r in records) and records == sorted(records, key=lambda r: -r["ms"])
    assert any(r["op"] == "ConvTranspose" or r["op"] == "Conv" for r in records if r["phase"] == "backward")
    lines = step_profile.summary(records, top=3)
    assert lines[0].startswith("kernel time") and "by phase" in lines[1] and len(lines) == 3 + 3
    step_profile.main([path, "--steps", "1", "--threads", "1", "--top", "2"])
    assert "by op:" in capsys.readouterr().out
