"""Standalone time of candidate standard-ONNX forms of a transformer's backward products at llama_small's
shapes (models/hf.py: width 256, SwiGLU 768, vocabulary 2,048, 4 heads of 64; batch 4 x 128 tokens).

- linear weight gradient dW (out, in) = sum over rows of g^T x, g (4, 128, out), x (4, 128, in):
  "default" (what ops/linear.py emits: Reshape both to rows, Transpose g, MatMul), "gemm" (Reshape both,
  one Gemm with transA=1), "batched" (Transpose g per sample, batched MatMul, ReduceSum over the batch),
  "einsum" (one Einsum "nto,nti->oi").
- attention's VJP products with a transposed operand, dV = P^T g and dK = dS^T q, P and dS (4, 4, 128, 128),
  g and q (4, 4, 128, 64): "default" (Transpose, MatMul, as ops/attention.py emits) and "einsum".

Each form is a small ONNX graph run by onnxruntime (runtime.session, 2 threads, full graph optimization) on
random inputs: the median of `--runs` runs after 3 warm-up runs, the forms of one product interleaved run
by run. The table in docs/benchmarks.md ("Transformer backward products") comes from this.

With --steps, whole llama_small training steps instead (schemes full and sparse, SGD): compiled once with
each op's default lowering and once with "gemm" for every matmul that offers it (ops/linear.py), stepped
by runtime.Trainer (2 threads) in rounds A B, B A, ...; the median over rounds of gemm/default step time.

    python -m experiments.transformer_product_times [--runs 30] [--steps --rounds 8]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper

from experiments.lowering_times import interleaved_medians
from pockprop.runtime.session import session
from pockprop.runtime.trainer import Trainer

N, T = 4, 128
LINEARS = [("q/k/v/o 256->256", 256, 256), ("gate/up 256->768", 256, 768), ("down 768->256", 768, 256),
           ("lm_head 256->2048", 256, 2048)]
HEADS, HEAD_DIM = 4, 64


def _model(inputs: dict[str, tuple[int, ...]], nodes: list[onnx.NodeProto], consts: dict[str, list[int]]) -> bytes:
    vi = [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs.items()]
    init = [helper.make_tensor(k, TensorProto.INT64, [len(v)], v) for k, v in consts.items()]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", vi, [out], initializer=init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def linear_weight_grad(n_in: int, n_out: int) -> dict[str, bytes]:
    """The forms of dW = g2^T x2 (inputs x (N, T, in), g (N, T, out))."""
    ins = {"x": (N, T, n_in), "g": (N, T, n_out)}
    rows = {"sx": [N * T, n_in], "sg": [N * T, n_out]}
    mk = helper.make_node
    flat = [mk("Reshape", ["x", "sx"], ["x2"]), mk("Reshape", ["g", "sg"], ["g2"])]
    return {
        "default": _model(ins, flat + [mk("Transpose", ["g2"], ["gt"], perm=[1, 0]), mk("MatMul", ["gt", "x2"], ["out"])], rows),
        "gemm": _model(ins, flat + [mk("Gemm", ["g2", "x2"], ["out"], transA=1)], rows),
        "transpose_gemm": _model(ins, flat + [mk("Transpose", ["g2"], ["gt"], perm=[1, 0]), mk("Gemm", ["gt", "x2"], ["out"])], rows),
        "batched": _model(ins, [mk("Transpose", ["g"], ["gt"], perm=[0, 2, 1]), mk("MatMul", ["gt", "x"], ["p"]),
                                mk("ReduceSum", ["p", "ax"], ["out"], keepdims=0)], {"ax": [0]}),
        "einsum": _model(ins, [mk("Einsum", ["g", "x"], ["out"], equation="nto,nti->oi")], {}),
    }


def linear_input_grad(n_in: int, n_out: int) -> dict[str, bytes]:
    """The forms of dx = g W (inputs g (N, T, out), w (out, in))."""
    ins = {"g": (N, T, n_out), "w": (n_out, n_in)}
    mk = helper.make_node
    return {
        "default": _model(ins, [mk("MatMul", ["g", "w"], ["out"])], {}),
        "gemm": _model(ins, [mk("Reshape", ["g", "sg"], ["g2"]), mk("Gemm", ["g2", "w"], ["y"]),
                             mk("Reshape", ["y", "sy"], ["out"])], {"sg": [N * T, n_out], "sy": [N, T, n_in]}),
    }


def transposed_product(k: int) -> dict[str, bytes]:
    """The forms of a^T b over the last two axes, a (N, H, T, T), b (N, H, T, k): attention's dV and dK."""
    ins = {"a": (N, HEADS, T, T), "b": (N, HEADS, T, k)}
    mk = helper.make_node
    return {
        "default": _model(ins, [mk("Transpose", ["a"], ["at"], perm=[0, 1, 3, 2]), mk("MatMul", ["at", "b"], ["out"])], {}),
        "einsum": _model(ins, [mk("Einsum", ["a", "b"], ["out"], equation="nhts,nhtd->nhsd")], {}),
    }


def time_forms(forms: dict[str, bytes], inputs: dict[str, tuple[int, ...]], runs: int, threads: int = 2) -> dict[str, float]:
    """Median ms per form, interleaved run by run; checks every form gives the default's values."""
    sessions = {k: session(m, threads=threads) for k, m in forms.items()}
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in inputs.items()}
    ref = sessions["default"].run(None, feeds)[0]
    for k, s in sessions.items():
        np.testing.assert_allclose(s.run(None, feeds)[0], ref, rtol=1e-4, atol=1e-3, err_msg=k)
    return interleaved_medians(sessions, feeds, runs, warmup=3)


def _gemm(key, node, options, types):  # type: ignore[no-untyped-def]
    return "gemm" if "gemm" in options else options[0]


def step_ratios(schemes: list[str], rounds: int, steps: int = 3) -> None:
    """Print, per scheme, llama_small's default step time and the median gemm/default ratio over rounds."""
    import torch

    from experiments.lowering_steps import _step_times
    from pockprop.compiler.compile import compile_traced, trace_model
    from pockprop.tracing import loader

    torch.manual_seed(0)
    model, _ = loader.resolve("models:llama_small")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2048, (N, T)).astype(np.int64)
    y = rng.integers(0, 2048, (N, T)).astype(np.int64)
    tm = trace_model(model, (torch.from_numpy(x),))
    for scheme in schemes:
        with tempfile.TemporaryDirectory() as tmp:
            trainers = []
            for k, chooser in enumerate((None, _gemm)):
                art = compile_traced(tm, optimizer={"name": "sgd", "lr": 0.01}, scheme=scheme,
                                     **({"choose_lowering": chooser} if chooser else {}))
                trainers.append(Trainer.load(art.save(f"{tmp}/{k}"), threads=2))
            for tr in trainers:
                _step_times(tr, x, y, 2)
            ratios, base = [], []
            for r in range(rounds):
                order = trainers if r % 2 == 0 else trainers[::-1]
                times = {id(tr): _step_times(tr, x, y, steps)[0] for tr in order}
                ratios.append(times[id(trainers[1])] / times[id(trainers[0])])
                base.append(times[id(trainers[0])])
        print(f"llama_small {scheme}: default {statistics.median(base):.1f} ms/step; gemm / default "
              f"{statistics.median(ratios):.3f} (rounds {min(ratios):.2f}-{max(ratios):.2f})", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", action="store_true", help="whole llama_small steps, default vs gemm")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--schemes", default="full,sparse")
    args = ap.parse_args(argv)
    if args.steps:
        step_ratios(args.schemes.split(","), args.rounds)
        return
    cases = [(f"linear dW {name}", linear_weight_grad(i, o), {"x": (N, T, i), "g": (N, T, o)}) for name, i, o in LINEARS]
    cases += [(f"linear dx {name}", linear_input_grad(i, o), {"g": (N, T, o), "w": (o, i)}) for name, i, o in LINEARS]
    cases += [("attention dV = P^T g", transposed_product(HEAD_DIM), {"a": (N, HEADS, T, T), "b": (N, HEADS, T, HEAD_DIM)})]
    print("| product | ms per form (fastest first) |")
    print("|---|---|")
    for name, forms, ins in cases:
        ms = time_forms(forms, ins, args.runs, args.threads)
        cells = ", ".join(f"{k} {t:.3f}" for k, t in sorted(ms.items(), key=lambda kv: kv[1]))
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
