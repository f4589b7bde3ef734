"""The one way pockprop makes an onnxruntime session: CPU provider, thread counts, spin-waiting, optimization
level, quiet log.

Spin-waiting is off: onnxruntime's intra-op threads sleep between ops instead of busy-waiting for the next one
(its default). A device trains beside other work (the app, its inference, other processes); threads that
spin take the cores that work needs, and when the cores are busy they take them from each other: a training
step of 2 threads on a loaded 2-core machine ran about 2x slower with spinning than without (docs/benchmarks.md,
"Spin-waiting"). `SPINNING = True` before sessions are made (or `options(spin=True)`) restores onnxruntime's
default, which can save the wake-up latency of each parallel op on cores nothing else uses.

Imports onnxruntime and numpy only (nothing of pockprop): bench/worker.py imports it under the peers'
interpreter too, where pockprop's other dependencies are absent.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnxruntime as ort

PROVIDERS = ["CPUExecutionProvider"]
QUIET = 3  # onnxruntime's log severity: errors only (its warnings and info would flood stderr)
SPINNING = False  # whether intra-op threads spin-wait between ops, for options(spin=None); see the module docstring


def options(threads: int | None = None, *, optimize: bool = True, spin: bool | None = None) -> ort.SessionOptions:
    """Session options: `threads` intra-op threads (None: onnxruntime's default, all cores), one inter-op
    thread, sequential execution, full graph optimization (optimize=False: the kernels exactly as the
    graph lowers them), errors-only logging; intra-op threads spin-wait between ops only if `spin`
    (None: the module's SPINNING, False unless a caller set it)."""
    opts = ort.SessionOptions()
    if not (SPINNING if spin is None else spin):
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = QUIET
    return opts


def session(model: bytes | str, threads: int | None = None, *, optimize: bool = True,
            external: Mapping[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """A CPU session of `model` (serialized bytes or a file path).

    external: the values of initializers whose data the model keeps in external files; onnxruntime then
    reads no file for them. The session refers to these arrays (no copy): they must outlive it, which the
    session guarantees by keeping them as `session.pockprop_external`.
    """
    opts = options(threads, optimize=optimize)
    values = []
    if external:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in external.values()]
        opts.add_external_initializers(list(external), values)
    sess = ort.InferenceSession(model, opts, providers=PROVIDERS)
    sess.pockprop_external = values  # type: ignore[attr-defined]  # keep the buffers alive with the session
    return sess
