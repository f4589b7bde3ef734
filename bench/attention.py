"""Microbenchmark: the attention training core with SDPA kept whole (the `attention` op) or decomposed.

`python -m pockprop.bench.attention --shape 4,4,256,64` builds, for q, k, v of shape (B, H, T, D) and a
causal additive mask, the forward output and dq, dk, dv from a given output cotangent, both ways, runs them
interleaved on onnxruntime (2 threads, no spin-waiting, so CPU time measures work) and prints wall, CPU
and kernel times. The decomposed form is what torch's math decomposition gives (safe softmax kept whole).
docs/benchmarks.md has the numbers that decided to keep SDPA whole.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pockprop.autodiff.backward import backward
from pockprop.emit.onnx import to_onnx
from pockprop.ir import Role, TensorType
from pockprop.ops.builder import Builder
from pockprop.ops.registry import FULL
from pockprop.passes.pipeline import TRAINING
from pockprop.tracing import trace as tracing


class _Attention(torch.nn.Module):
    def __init__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Parameter(torch.from_numpy(a)) for a in (q, k, v))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=mask)


def build(arrays: dict[str, np.ndarray], whole: bool) -> tuple[Any, dict[str, np.ndarray]]:
    """(ONNX model, feeds) of the attention core's forward and q/k/v gradients."""
    keep = tracing.KEEP
    if not whole:
        tracing.KEEP = tuple(op for op in keep if "scaled_dot_product" not in op)
    try:
        g = tracing.trace(_Attention(arrays["q"], arrays["k"], arrays["v"]), (torch.from_numpy(arrays["mask"]),)).graph
    finally:
        tracing.KEEP = keep
    for n in ("q", "k", "v"):
        g.lift(n, Role.PARAMETER)
    b = Builder(g)
    (y,) = g.outputs
    cot = g.add_input("cot", TensorType(g.types[y].shape, "float32"), Role.DATA)
    loss = b.op("sum", [b.op("mul", [y, cot])], axes=list(range(g.types[y].rank)), keepdim=False)
    grads = backward(g, loss, {n: FULL for n in ("q", "k", "v")})
    g.outputs = [y] + [grads[n] for n in ("q", "k", "v")]
    g = TRAINING(g).graph
    mask = next(i for i in g.inputs if i not in ("q", "k", "v", "cot"))
    return to_onnx(g, "attention"), {**{n: arrays[n] for n in ("q", "k", "v", "cot")}, mask: arrays["mask"]}


def _session(model: Any, threads: int, profile: str | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _kernel_ms(model: Any, feeds: dict[str, np.ndarray], threads: int, runs: int = 10) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(model, threads, f"{tmp}/prof")
        for _ in range(runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per: dict[str, float] = collections.defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per[ev["args"]["op_name"]] += ev["dur"] / runs / 1000
    return sum(per.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4,4,256,64", help="B,H,T,D")
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    bsz, heads, t, d = (int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    arrays = {n: rng.standard_normal((bsz, heads, t, d), dtype=np.float32) for n in ("q", "k", "v", "cot")}
    arrays["mask"] = np.broadcast_to(np.triu(np.full((t, t), -np.inf, np.float32), 1), (bsz, 1, t, t)).copy()
    runs = {"whole": build(arrays, True), "decomposed": build(arrays, False)}
    sessions = {k: _session(m, args.threads) for k, (m, _) in runs.items()}
    outs = {k: sessions[k].run(None, runs[k][1]) for k in runs}
    diff = max(float(np.abs(a - c).max()) for a, c in zip(outs["whole"], outs["decomposed"]))
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):  # interleaved, so drifting load hits both alike
        for k, (_, feeds) in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            sessions[k].run(None, feeds)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    print(f"attention core, (B, H, T, D) = {args.shape}, {args.threads} threads, {args.reps} interleaved runs; "
          f"outputs agree to {diff:.1e}")
    for k, (model, feeds) in runs.items():
        print(f"  {k:10s} {len(model.graph.node):3d} ONNX nodes: wall median {np.median(wall[k]) * 1e3:6.2f} ms, "
              f"min {min(wall[k]) * 1e3:6.2f} ms; CPU median {np.median(cpu[k]) * 1e3:6.2f} ms; "
              f"kernel time {_kernel_ms(model, feeds, args.threads):6.2f} ms")


if __name__ == "__main__":
    main()
