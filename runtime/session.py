"""The one way pockprop makes an onnxruntime session: execution provider, thread counts, spin-waiting,
optimization level, quiet log.

Spin-waiting is off: onnxruntime's intra-op threads sleep between ops instead of busy-waiting for the next one
(its default). A device trains beside other work (the app, its inference, other processes); threads that
spin take the cores that work needs, and when the cores are busy they take them from each other: 2 threads
on a loaded 2-core machine took 30-36 ms with spinning for an attention step that runs in 12 ms without it
(docs/benchmarks.md, "Spin-waiting"). `SPINNING = True` before sessions are made (or `options(spin=True)`)
restores onnxruntime's default, which can save the wake-up latency of each parallel op on cores nothing else
uses.

Imports onnxruntime and numpy only (nothing of pockprop): bench/worker.py imports it under the peers'
interpreter too, where pockprop's other dependencies are absent.

Providers (`--provider`): `cpu`, or `cuda`, onnxruntime's CUDAExecutionProvider (onnxruntime-gpu, e.g. on
a Jetson) with the CPU provider behind it for the nodes CUDA does not run. Where the installed onnxruntime
has no CUDA provider, or a session cannot start it (no CUDA libraries), the session runs on the CPU and a
ProviderFallback warning says so in one line.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CPU = [PROVIDER_NAMES["cpu"]]
PROVIDERS = CPU  # the default
QUIET = 3  # onnxruntime's log severity: errors only (its warnings and info would flood stderr)
SPINNING = False  # whether intra-op threads spin-wait between ops, for options(spin=None); see the module docstring


class ProviderFallback(UserWarning):
    """The provider asked for is not usable here; the session runs on the CPU."""


def providers_for(name: str = "cpu") -> list[str]:
    """onnxruntime's provider list for `name` (a key of PROVIDER_NAMES); the CPU's, with a ProviderFallback
    warning, where the installed onnxruntime lacks that provider. ValueError for an unknown name."""
    if name not in PROVIDER_NAMES:
        raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDER_NAMES)}")
    wanted = PROVIDER_NAMES[name]
    if wanted == CPU[0]:
        return list(CPU)
    if wanted not in ort.get_available_providers():
        _fallback(f"onnxruntime {ort.__version__} here has no {wanted} (it comes with onnxruntime-gpu)")
        return list(CPU)
    return [wanted, *CPU]


def _fallback(why: str) -> None:
    warnings.warn(f"{why}: running on the CPU", ProviderFallback, stacklevel=3)


def options(threads: int | None = None, *, optimize: bool = True, spin: bool | None = None,
            mem_pattern: bool = True) -> ort.SessionOptions:
    """Session options: `threads` intra-op threads (None: onnxruntime's default, all cores), one inter-op
    thread, sequential execution, full graph optimization (optimize=False: the kernels exactly as the
    graph lowers them), errors-only logging; intra-op threads spin-wait between ops only if `spin`
    (None: the module's SPINNING, False unless a caller set it); onnxruntime's memory pattern only if
    `mem_pattern` (see `session`)."""
    opts = ort.SessionOptions()
    opts.enable_mem_pattern = mem_pattern
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


def session(model: bytes | str, threads: int | None = None, *, optimize: bool = True, mem_pattern: bool = True,
            external: Mapping[str, np.ndarray] | None = None,
            providers: Sequence[str] = PROVIDERS) -> ort.InferenceSession:
    """A session of `model` (serialized bytes or a file path) on `providers` (a list from `providers_for`).

    external: the values of initializers whose data the model keeps in external files; onnxruntime then
    reads no file for them. It copies them into the session (AddExternalInitializers: "the user provided
    buffers can then be deallocated" once the session is made), so they need not outlive it. Inputs and
    outputs stay in CPU memory whatever the provider (onnxruntime copies them to the device and back).

    mem_pattern: onnxruntime's memory pattern (its default). After the first run it plans every intermediate
    into one block, which later runs allocate on top of the arena chunks the first run still holds (the arena
    never shrinks). For a training step, whose intermediates (saved activations, gradients) are most of its
    memory, that doubles them: the Llama-shaped model's `sparse` step peaked 116 MB above its loaded session
    with the pattern and 57 MB without it, at the same speed (docs/benchmarks.md, "Transformers"); the
    trainer turns it off for its step session.
    """
    opts = options(threads, optimize=optimize, mem_pattern=mem_pattern)
    if external:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in external.values()]
        opts.add_external_initializers(list(external), values)
    with warnings.catch_warnings():  # onnxruntime's own multi-line note on a missing provider; ours follows
        warnings.filterwarnings("ignore", "Specified provider", UserWarning)
        sess = ort.InferenceSession(model, opts, providers=list(providers))
    if providers[0] not in sess.get_providers():  # available in the build, but it did not start here
        _fallback(f"onnxruntime could not start {providers[0]}")
    return sess
