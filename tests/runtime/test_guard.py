"""The training guard (runtime.guard): a diverging run never replaces the last good checkpoint and ends
with exit 3; a normal run never trips it; the rules one by one."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pockprop.cli import main
from pockprop.errors import TrainingFailed
from pockprop.runtime import checkpoint, data, guard
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer
from tests.runtime.conftest import batch, dataset_npz


@pytest.fixture
def good_checkpoint(artifact, tmp_path: Path) -> tuple[str, Path, bytes]:
    """(artifact, checkpoint directory, its checkpoint's bytes) after one round at the compiled rate."""
    art, ck = str(artifact()), tmp_path / "ck"
    assert main(["train", art, "--data", str(dataset_npz(tmp_path / "a.npz", seed=1)), "--epochs", "3",
                 "--checkpoint-dir", str(ck), "--no-progress"]) == 0
    return art, ck, (ck / checkpoint.FILE).read_bytes()


@pytest.mark.parametrize("extra", [["--lr", "10"], ["--lr", "100"], ["--lr", "1e30"], ["--lr", "1e30", "--guard", "loss"]],
                         ids=["lr10-creeps", "lr100", "lr1e30", "lr1e30-guard-loss"])
def test_a_diverging_round_keeps_the_good_checkpoint_and_exits_3(good_checkpoint, tmp_path: Path, capsys,
                                                                 extra: list[str]) -> None:
    art, ck, good = good_checkpoint
    capsys.readouterr()
    new = str(dataset_npz(tmp_path / "b.npz", seed=2))
    assert main(["train", art, "--data", new, "--epochs", "3", "--checkpoint-dir", str(ck), "--resume",
                 "--no-progress", *extra]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pockprop train: failed: training ") and f"{ck / checkpoint.FILE} (step 30), is kept" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert (ck / checkpoint.FILE).read_bytes() == good  # not a byte replaced


def test_a_normal_round_after_it_trains_on(good_checkpoint, tmp_path: Path) -> None:
    art, ck, _ = good_checkpoint
    assert main(["train", art, "--data", str(dataset_npz(tmp_path / "b.npz", seed=2)), "--epochs", "3",
                 "--checkpoint-dir", str(ck), "--resume", "--no-progress"]) == 0
    assert checkpoint.load(str(ck))[1]["steps"] == 60


@pytest.mark.parametrize("name", ["mlp", "mlp_adamw", "sliced"])
@pytest.mark.parametrize("scale", [1, 3])
def test_normal_runs_never_trip_the_guard(artifact, tmp_path: Path, name: str, scale: int) -> None:
    """The compiled learning rate and three times it, from scratch and for a second round: no step rejected."""
    trainer = Trainer.load(str(artifact(name)))
    lr = float(trainer.manifest.lr.initial) * scale
    for seed in (1, 2):
        ds = data.load(str(dataset_npz(tmp_path / f"{seed}.npz", n=64, seed=seed)))
        record = fit(trainer, ds, 5, seed=seed, schedule={"name": "cosine", "base_lr": lr, "warmup_steps": 3},
                     checkpoint_dir=str(tmp_path / "ck"))
        assert record["rejected"] == 0 and trainer.divergence() is None


def test_guard_loss_never_saves_non_finite_state(artifact, tmp_path: Path) -> None:
    trainer = Trainer.load(str(artifact()))
    trainer.step(*batch(0))
    path = Path(trainer.save_checkpoint(str(tmp_path / "ck")))
    good = path.read_bytes()
    trainer.guard = "loss"  # the loss is checked, not the update: a NaN learning rate gets through
    assert trainer.step(*batch(1), lr=float("nan")) is not None
    with pytest.raises(TrainingFailed, match=r"'2.weight' holds NaN or Inf\): not saved; the last checkpoint, .* is kept"):
        trainer.save_checkpoint(str(tmp_path / "ck"))
    assert path.read_bytes() == good


def test_a_round_with_most_steps_rejected_fails(artifact, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    x[::3, 0] = np.nan  # two batches in three hold a NaN sample
    np.savez(tmp_path / "nan.npz", x=x, y=rng.integers(0, 3, 40))
    assert main(["train", str(artifact()), "--data", str(tmp_path / "nan.npz"), "--epochs", "2", "--no-progress"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training stopped: 17 of the round's 20 steps were rejected, the last because the batch holds NaN or Inf" in err
    assert "nothing was saved (no checkpoint directory)" in err


def test_every_step_rejected_stops_the_round_early(artifact, tmp_path: Path) -> None:
    trainer = Trainer.load(str(artifact()))
    ds = data.load(str(dataset_npz(tmp_path / "d.npz", n=200)))
    with pytest.raises(TrainingFailed, match=f"the last {guard.STOP_AFTER} steps were all rejected"):
        fit(trainer, ds, 3, schedule={"name": "constant", "base_lr": 1e30})
    assert trainer.steps == 0 and trainer.rejected == guard.STOP_AFTER  # not 150 steps


def test_spike_and_drift_rules() -> None:
    b = guard.Baseline(floor=0.1)
    assert b.spike(1e6) is None  # the round's first step: nothing to compare with
    b.accepted(0.5)
    limit = guard.SPIKE * 0.5
    assert b.spike(limit * 0.99) is None and f"over {guard.SPIKE:g} times the largest recent loss 0.5" in b.spike(limit * 1.01)
    assert "non-finite" in b.spike(math.inf)
    small = guard.Baseline(floor=0.1)
    small.accepted(0.01)
    assert small.spike(guard.SPIKE * 0.1 * 0.99) is None  # one hard sample in a small batch: the floor is the scale
    for loss in [0.5 * guard.DRIFT * 0.95] * 40:
        b.accepted(loss)
    assert b.drift() is None  # the round's first loss (0.5) is the drift's scale, the recent ones the spike's
    assert b.spike(guard.SPIKE * 0.5 * guard.DRIFT * 0.9) is None
    b.accepted(0.5 * guard.DRIFT * 5)
    assert f"times the round's first loss 0.5 (limit {guard.DRIFT:g}" in b.drift()
    assert guard.Baseline.from_json(b.to_json()) == b
    with pytest.raises(ValueError, match="guard: expected"):
        guard.Baseline.from_json({"floor": 0.1, "norms": [], "first": "x", "recent": []})


def test_update_rule_floors_zero_tensors_by_the_model_scale() -> None:
    w, zero = np.ones(100, np.float32), np.zeros(10, np.float32)
    names = ["w", "b"]
    assert guard.update_explodes(names, [w, zero], [w * 1.5, zero + 0.5]) is None  # the bias moved within the scale
    assert "'b' is 4.2 times its norm" in guard.update_explodes(names, [w, zero], [w, zero + 4.0])
    assert "'w' is 4.5 times its norm" in guard.update_explodes(names, [w, zero], [w * 5.5, zero])
    assert guard.update_explodes(names, [zero[:4], zero], [zero[:4] + 9, zero]) is None  # no scale at all
    assert "non-finite" in guard.update_explodes(["w"], [w], [w * np.nan])
    assert "too large for its dtype" in guard.update_explodes(["w"], [w], [w * np.float32(1e30)])
    assert guard.grown(names, [w * guard.GROWTH * 0.9, zero + 1], guard.norms([w, zero])) is None
    assert "the norm of 'w' grew 1.1e+03 times this round" in guard.grown(names, [w * 1100, zero], guard.norms([w, zero]))


def test_the_baseline_is_saved_and_resumed(artifact, tmp_path: Path) -> None:
    trainer = Trainer.load(str(artifact()))
    for seed in range(5):
        trainer.step(*batch(seed))
    trainer.save_checkpoint(str(tmp_path / "ck"))
    resumed = Trainer.load(str(artifact()))
    resumed.resume(str(tmp_path / "ck"))
    assert resumed.baseline == trainer.baseline and len(trainer.baseline.recent) == 5


def test_a_checkpoint_is_not_written_of_a_state_whose_loss_exploded(artifact, tmp_path: Path) -> None:
    trainer = Trainer.load(str(artifact()))
    trainer.guard = "loss"  # lets a huge update through: the save measures the state
    for seed in range(3):
        trainer.step(*batch(seed))
    path = Path(trainer.save_checkpoint(str(tmp_path / "ck")))
    good = path.read_bytes()
    x, y = batch(3)
    assert trainer.step(x, (y + 1) % 3, lr=1e4) is not None  # a step toward the wrong classes
    with pytest.raises(TrainingFailed, match="not saved"):
        trainer.save_checkpoint(str(tmp_path / "ck"))
    assert path.read_bytes() == good
