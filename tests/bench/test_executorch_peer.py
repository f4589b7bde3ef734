"""The ExecuTorch rows of `pockprop bench` where no ExecuTorch venv exists (CI): skipped with the reason. The rows
themselves need executorch (`make peers` builds .venv-et); nothing here imports it."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from pockprop.bench.executorch_peer import op_times
from pockprop.bench.peers import et_status, et_train_skip
from pockprop.bench.harness import build_note
from pockprop.cli import main


def test_et_status_explains_a_missing_venv_and_a_missing_executorch(tmp_path):
    missing = str(tmp_path / "nope" / "python")
    why = et_status(missing)
    assert why and "make peers" in why and "--et-python" in why and missing in why
    why = et_status(sys.executable)  # the test venv has torch but no executorch
    assert why and "does not import" in why and "executorch" in why


def test_et_rows_train_with_sgd_only():
    assert et_train_skip({"name": "sgd", "lr": 0.1, "momentum": 0.9}) is None
    assert "no adamw optimizer" in et_train_skip({"name": "adamw", "lr": 1e-3})


def test_build_note():
    assert build_note(None) == "" and build_note({}) == ""
    assert build_note({"export_s": 12.34}) == " (export 12.3 s)"
    note = build_note({"export_s": 2.0, "check_max_abs_err": 1.5e-7, "check_max_abs_step": 0.004})
    assert note == " (export 2.0 s; step vs torch SGD: max abs err 1.5e-07 (update 4.0e-03))"
    note = build_note({"export_s": 2.0, "check_max_abs_err": 32.0, "check_max_abs_step": 0.05, "check_ok": False,
                       "check_worst": "conv1.weight"})
    assert "CHECK FAILED on conv1.weight: step vs torch SGD: max abs err 3.2e+01" in note


def test_bench_skips_the_et_rows_with_the_reason(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "mlp", "--batch", "2", "--rounds", "1", "--warmup", "0", "--steps", "1",
               "--threads", "1", "--quiet", "--json", str(out), "--et-python", str(tmp_path / "none" / "python"),
               "--configs", "ort-infer", "et-infer", "et-full", "et-sparse"])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["configs"]}
    assert rows["ort-infer"]["status"] == "ok"
    for name, kind in (("et-infer", "et-infer"), ("et-full", "et-train"), ("et-sparse", "et-train")):
        assert rows[name]["status"] == "skipped" and rows[name]["kind"] == kind
        assert "make peers" in rows[name]["reason"] and "--et-python" in rows[name]["reason"]
    rc = main(["bench", "--model", "mlp", "--batch", "2", "--rounds", "1", "--warmup", "0", "--steps", "1",
               "--threads", "1", "--quiet", "--json", str(out), "--no-et", "--configs", "ort-infer", "et-full"])
    rows = {r["name"]: r for r in json.loads(out.read_text())["configs"]}
    assert rc == 0 and rows["et-full"]["reason"] == "disabled (--no-et)"


def test_op_times_sums_each_kernel_without_the_bookkeeping_events():
    def ev(name, start, end):
        return SimpleNamespace(profile_event=SimpleNamespace(name=name, start_time=start, end_time=end))
    events = [ev("Method::execute", 0, 10_000_000), ev("OPERATOR_CALL", 0, 4_000_000),
              ev("native_call_convolution.out", 0, 1_000_000), ev("native_call_add.out", 0, 2_000_000),
              ev("native_call_convolution.out", 0, 3_000_000), SimpleNamespace(profile_event=None)]
    assert op_times(events) == [("native_call_convolution.out", 2, 4.0, 4 / 6), ("native_call_add.out", 1, 2.0, 2 / 6)]
    assert op_times([]) == []
