"""`pip install .` gives one package, `pockprop`, with everything of the source tree it maps, and the device
install (numpy + onnxruntime, no torch) runs `pockprop train` from it.

The wheel is built once per session from a copy of the checkout (a build in place would leave `build/`
behind, whose stale files setuptools would put into the next wheel). Building takes a few seconds; the
clean-venv install fetches numpy and onnxruntime from the machine's package index (marked slow).
"""
from __future__ import annotations

import email
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import pockprop
from tests.runtime.conftest import dataset_npz

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = {"tests", "experiments"}  # folders of Python code that stay in the repository
# everything a checkout holds that is not the source: never copied into the build
IGNORED = shutil.ignore_patterns(".git", ".venv*", ".cache", "out", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".hypothesis", "shared")


def _mapping() -> dict[str, str]:
    """pockprop package -> its folder in the repository, as pyproject.toml maps them."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "deprecat" not in out.stderr.lower(), out.stderr[-3000:]  # a pyproject.toml setuptools will keep reading
    [whl] = (tmp / "dist").glob("*.whl")
    return whl


def test_every_folder_of_code_is_mapped() -> None:
    """Each folder of Python code at the top (and below a mapped one) is a package in pyproject.toml."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: pkg for pkg, folder in _mapping().items()}
    assert set(conf["packages"]) == set(_mapping()), "packages and package-dir must list the same packages"
    for top in sorted(p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if top.name in NOT_INSTALLED or not any(top.rglob("*.py")):
            continue
        assert top.name in mapped, f"{top.name}/ holds Python code but pyproject.toml does not map it"
        for sub in top.rglob("*.py"):
            folder = sub.parent.relative_to(ROOT).as_posix()
            assert folder in mapped, f"{folder}/ holds Python code but is not a package of pyproject.toml"


def test_wheel_holds_pockprop_only(wheel: Path) -> None:
    assert wheel.name == f"pockprop-{pockprop.__version__}-py3-none-any.whl"  # pure Python: one wheel for every board
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"pockprop-{pockprop.__version__}.dist-info"
    assert {n.split("/")[0] for n in names} == {"pockprop", dist_info}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    expected = {f"{pkg.replace('.', '/')}/{f.name}" for pkg, folder in _mapping().items()
                for f in (ROOT / folder).glob("*.py")}
    assert expected <= set(names), sorted(expected - set(names))
    assert {n for n in names if n.endswith(".py")} == expected, "the wheel holds Python files the checkout has not"
    assert "pockprop/py.typed" in names
    shipped = {f"pockprop/compiler/profiles/{f.name}" for f in (ROOT / "compiler" / "profiles").glob("*.json")}
    assert len(shipped) >= 2 and shipped <= set(names), "the target profiles are package data"


def test_wheel_metadata(wheel: Path) -> None:
    z = zipfile.ZipFile(wheel)
    dist_info = f"pockprop-{pockprop.__version__}.dist-info"
    meta = email.message_from_bytes(z.read(f"{dist_info}/METADATA"))
    assert meta["Name"] == "pockprop" and meta["Version"] == pockprop.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    required = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in meta.get_all("Requires-Dist")
                if "extra ==" not in r}
    assert required == {"numpy", "onnxruntime"}  # the device install: nothing else
    licenses = [n for n in z.namelist() if n.startswith(dist_info) and n.endswith("LICENSE")]
    assert licenses and z.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
    entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    assert "[console_scripts]" in entry_points and "pockprop = pockprop.cli:main" in entry_points
    assert z.read(f"{dist_info}/top_level.txt").decode().split() == ["pockprop"]


def _artifact(out: Path) -> Path:
    import torch

    from pockprop import compile

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    art = compile(model, (torch.randn(4, 6),), optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}, name="mlp")
    return Path(art.save(str(out)))


@pytest.mark.slow
def test_clean_venv_install_trains_without_torch(wheel: Path, tmp_path: Path) -> None:
    """A venv without system packages: the wheel (no deps), then numpy and onnxruntime from the index."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    for args in (["--no-deps", str(wheel)], ["numpy", "onnxruntime"]):
        out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *args],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    art, data, ck = _artifact(tmp_path / "art"), dataset_npz(tmp_path / "d.npz", n=40), tmp_path / "ck"
    work = tmp_path / "elsewhere"  # not the checkout: nothing of the source tree is importable from here
    work.mkdir()

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), cwd=work, capture_output=True, text=True, timeout=300,
                              env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)})

    probe = run(str(python), "-c", "import importlib.util as u, json, pockprop; print(json.dumps({'file': "
                "pockprop.__file__, 'found': [n for n in ('torch', 'onnx', 'yaml', 'engine', 'runtime', 'models', "
                "'passes', 'ir', 'ops', 'compiler', 'artifact', 'search') if u.find_spec(n)]}))")
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["found"] == [] and found["file"].startswith(str(venv))
    version = run(str(venv / "bin" / "pockprop"), "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"pockprop {pockprop.__version__}", version.stderr
    train = run(str(venv / "bin" / "pockprop"), "train", str(art), "--data", str(data), "--epochs", "8",
                "--checkpoint-dir", str(ck), "--no-progress", "--json")
    assert train.returncode == 0, train.stderr
    losses = json.loads(train.stdout)["round"]["epoch_losses"]
    assert losses[-1] < 0.6 * losses[0], losses
    exported = run(str(venv / "bin" / "pockprop"), "export", str(art), "--checkpoint-dir", str(ck), "-o",
                   str(tmp_path / "model.onnx"))
    assert exported.returncode == 0, exported.stderr
