"""The aarch64 comparison of `make arm-check`, run here when its emulator is already built (no download
in `make test`; `make arm-check` builds it, about a minute cold)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime import arm_check


def test_emulated_aarch64_training_matches_x86(tmp_path: Path) -> None:
    python = arm_check.TARGET / "bin" / "python3"
    if not python.exists():
        pytest.skip(f"no emulated aarch64 Python in {arm_check.TARGET} (run `make arm-check` to build it)")
    native, arm, loss_diff, preds_agree = arm_check.compare(tmp_path, str(python))
    assert arm["machine"] == "aarch64"
    assert loss_diff <= arm_check.RTOL, (native["losses"], arm["losses"])
    assert preds_agree
