"""write_atomic's temp file is created exclusively under a random name: a planted file or symbolic link
is never written through, and remove_stale_temps still finds what a killed writer left."""
from __future__ import annotations

import os
from pathlib import Path

from pockprop.artifact import durable


def test_a_symlink_planted_at_the_old_predictable_temp_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, tmp_path / f".out.bin{durable.TMP_MARK}{os.getpid()}")
    durable.write_atomic(str(tmp_path / "out.bin"), b"new data\n")
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "out.bin").is_symlink() and (tmp_path / "out.bin").read_bytes() == b"new data\n"


def test_a_taken_temp_name_is_never_opened(tmp_path: Path, monkeypatch) -> None:
    """Even when the 'random' name is guessed, O_EXCL refuses what is there and another name is drawn."""
    names = iter(["guessed", "guessed", "fresh"])
    monkeypatch.setattr(durable.secrets, "token_hex", lambda n: next(names))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    planted = tmp_path / f".out.bin{durable.TMP_MARK}{os.getpid()}-guessed"
    os.symlink(victim, planted)
    durable.write_atomic(str(tmp_path / "out.bin"), b"new data\n")
    assert victim.read_text() == "precious\n" and planted.is_symlink()  # untouched, and not ours to delete
    assert (tmp_path / "out.bin").read_bytes() == b"new data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([planted.name, "out.bin", "victim.txt"])


def test_stale_temps_of_the_new_names_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.safetensors"
    stale = Path(durable._temp_name(str(target)))
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / "other.txt").write_text("keep")
    durable.remove_stale_temps(str(tmp_path), target.name)
    assert not stale.exists() and (tmp_path / "other.txt").exists()
    durable.write_atomic(str(target), b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "other.txt"]
