"""The device runtime works where torch, onnx and networkx cannot be imported."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from engine.compile import compile

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = textwrap.dedent("""
    import sys
    class _Block:
        # A meta-path finder that makes the compile-side packages unimportable, as on a device.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "onnx", "networkx", "yaml"}:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
    sys.meta_path.insert(0, _Block())
""")


def _artifact(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    art = compile(model, (torch.randn(4, 6),), optimizer={"name": "sgd", "lr": 0.5}, trainable=["2.*"])
    return Path(art.save(str(tmp_path / "art")))


def test_runtime_trains_without_torch(tmp_path: Path) -> None:
    art = _artifact(tmp_path)
    script = BLOCKER + textwrap.dedent(f"""
        import json, numpy as np
        from runtime.trainer import Trainer
        t = Trainer.load({str(art)!r})
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, 6)).astype(np.float32)
        y = np.array([0, 1, 2, 1])
        losses = [t.step(x, y) for _ in range(20)]
        pred = t.predict(x)
        banned = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "onnx", "networkx", "engine"}})
        print(json.dumps({{"losses": losses, "pred_shape": list(pred.shape), "banned": banned}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["banned"] == []
    assert res["pred_shape"] == [4, 3]
    assert res["losses"][-1] < 0.5 * res["losses"][0], res["losses"]


def test_cli_compile_subcommand_says_what_to_install_without_torch() -> None:
    script = BLOCKER + "from runtime.cli import main\nsys.exit(main(['compile', 'models:mlp', '-o', '/nonexistent']))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "pockprop[compile]" in out.stderr
    assert "Traceback" not in out.stderr
