"""The one way pockprop makes an onnxruntime session: CPU provider, thread counts, optimization level, quiet log.

Imports onnxruntime and numpy only (nothing of pockprop): bench/worker.py imports it under the peers'
interpreter too, where pockprop's other dependencies are absent.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnxruntime as ort

PROVIDERS = ["CPUExecutionProvider"]
QUIET = 3  # onnxruntime's log severity: errors only (its warnings and info would flood stderr)


def options(threads: int | None = None, *, optimize: bool = True) -> ort.SessionOptions:
    """Session options: `threads` intra-op threads (None: onnxruntime's default, all cores), one inter-op
    thread, sequential execution, full graph optimization (optimize=False: the kernels exactly as the
    graph lowers them), errors-only logging."""
    opts = ort.SessionOptions()
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
    reads no file for them. It copies them into the session (AddExternalInitializers: "the user provided
    buffers can then be deallocated" once the session is made), so they need not outlive it.
    """
    opts = options(threads, optimize=optimize)
    if external:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in external.values()]
        opts.add_external_initializers(list(external), values)
    return ort.InferenceSession(model, opts, providers=PROVIDERS)
