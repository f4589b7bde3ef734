"""Every package of the [compile] extra is used by the code: the extra installs nothing dead."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = {"pyyaml": "yaml"}  # distribution name -> the module it installs, where they differ


def test_compile_extra_is_all_used() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = project["tool"]["setuptools"]["package-dir"].values()
    source = "\n".join(p.read_text() for f in folders for p in (ROOT / f).rglob("*.py"))
    for requirement in project["project"]["optional-dependencies"]["compile"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        module = MODULE.get(name, name)
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), f"{name} is declared but never imported"
