"""The device runtime works where torch, onnx and pyyaml cannot be imported."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np

from tests.runtime.conftest import BLOCKER, PY, ROOT, dataset_npz


def _run(script: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", BLOCKER + textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_load_train_checkpoint_export_without_torch(artifact, tmp_path: Path) -> None:
    art, d = artifact(), dataset_npz(tmp_path / "d.npz", n=40)
    ck, model = tmp_path / "ck", tmp_path / "model.onnx"
    out = _run(f"""
        import json, numpy as np, onnxruntime as ort
        from pockprop.cli import main
        from pockprop.runtime.trainer import Trainer
        assert main(["train", {str(art)!r}, "--data", {str(d)!r}, "--epochs", "8", "--checkpoint-dir", {str(ck)!r},
                     "--no-progress"]) == 0
        assert main(["train", {str(art)!r}, "--data", {str(d)!r}, "--epochs", "1", "--checkpoint-dir", {str(ck)!r},
                     "--resume", "--no-progress"]) == 0
        assert main(["export", {str(art)!r}, "--checkpoint-dir", {str(ck)!r}, "-o", {str(model)!r}]) == 0
        t = Trainer.load({str(art)!r})
        t.resume({str(ck)!r})
        x = np.load({str(d)!r})["x"][:4]
        exported = ort.InferenceSession({str(model)!r}).run(None, {{"input": x}})[0]
        assert np.allclose(exported, t.predict(x), rtol=1e-5, atol=1e-6)
        banned = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "onnx", "yaml"}})
        print(json.dumps({{"banned": banned, "steps": t.steps, "rounds": t.rounds}}))
    """)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["banned"] == [] and res["steps"] == 90
    first, second = res["rounds"][0]["epoch_losses"], res["rounds"][1]["epoch_losses"]
    assert first[-1] < 0.6 * first[0] and second[0] <= first[-1] * 1.2


def test_runtime_imports_only_numpy_and_onnxruntime() -> None:
    out = _run("""
        import pockprop.cli
        import pockprop.runtime.commands
        import pockprop.runtime.trainer
        import pockprop.runtime.loop
        import pockprop.runtime.data
        import pockprop.runtime.images
        import pockprop.runtime.inputs
        import pockprop.runtime.text
        import pockprop.artifact.onnx_wire
        third = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"runtime", "__main__"})
        print(" ".join(third))
    """)
    assert out.returncode == 0, out.stderr
    third = set(out.stdout.split())
    assert {"numpy", "onnxruntime"} <= third
    # onnxruntime's own imports (its packaging/protobuf helpers) are allowed; torch-side packages are not
    assert not third & {"torch", "onnx", "yaml", "PIL"}, third


def test_cli_compile_subcommand_says_what_to_install_without_torch() -> None:
    out = _run("from pockprop.cli import main\nsys.exit(main(['compile', 'models:mlp', '-o', '/nonexistent']))", 60)
    assert out.returncode == 2
    assert "pockprop[compile]" in out.stderr
    assert "Traceback" not in out.stderr


def test_runtime_errors_without_torch_exit_2(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 6), np.float32), y=np.zeros(4))
    out = _run(f"from pockprop.cli import main\nsys.exit(main(['train', {str(tmp_path / 'nope')!r}, '--data', "
               f"{str(tmp_path / 'd.npz')!r}]))", 60)
    assert out.returncode == 2 and "no such artifact" in out.stderr and "Traceback" not in out.stderr
