"""The cost model: a Chooser (passes/lowerings.py) that picks each node's lowering from its shapes alone.

It stands in where no profile measured on the target exists: the compile default. Its rule was fitted to standalone timings
of every lowering at ResNet-18 and MobileNetV2 layer shapes (batch 8, 128x128, onnxruntime on 2 x86-64
threads: experiments/lowering_times.py; the numbers are in docs/benchmarks.md, "Backward-op lowerings"),
keeping the default wherever an alternative did not win clearly and repeatedly:

- conv2d_weight_grad of a dense (groups 1) conv with a k x k kernel other than an unpadded 1x1: "taps"
  (one GEMM per tap) from MIN_TAPS_CHANNELS input channels and up to 25 taps, else "im2col". Both beat
  the swapped-axes Conv at every dense 3x3 shape measured; "taps" never holds the k*k-times-x patch
  matrix, so it is the choice where both apply, except on a stem (3 input channels), where its per-tap
  GEMMs are too thin.
- conv2d_weight_grad of a depthwise conv (one input channel per group) at stride 1 with an output of at
  least MIN_DEPTHWISE_PIXELS pixels: "depthwise_taps"; strided, or on smaller maps, the default.
- conv2d_weight_grad of an unpadded 1x1 conv (groups 1) with an output of at least MIN_BATCHED_PIXELS
  pixels: "batched_gemm"; on smaller maps the (samples, c_out, c_in) products it sums outweigh the moves
  it saves, so the default.
- everything else, conv2d_input_grad included: the op's default ("subpixel" and "zero_interleave" lost
  to ConvTranspose at every shape measured; "conv" vs "conv_transpose" stayed within noise of the
  default's own pick). matmul by a matrix (linear's weight and input gradients): the default MatMul; "gemm"
  was 3-7 % faster standalone on most weight gradients at llama_small's shapes but within about 1 % (noise)
  on whole steps (docs/benchmarks.md,
  "Transformer backward products").
"""
from __future__ import annotations

from typing import Mapping

from pockprop.ir import Node, TensorType

MIN_TAPS_CHANNELS = 16  # input channels below which "taps" lost to "im2col" (a 3-channel stem)
MIN_DEPTHWISE_PIXELS = 256  # output pixels per map below which depthwise_taps lost to the default
MIN_BATCHED_PIXELS = 256  # output pixels per map below which batched_gemm lost to the default


def cost_model_lowering(key: str, node: Node, options: tuple[str, ...], types: Mapping[str, TensorType]) -> str:
    """The lowering the rule above picks for `node` among `options` (options[0], the default, if none applies)."""
    if node.op == "conv2d_weight_grad":
        ho, wo = types[node.inputs[1]].shape[2:]
        stride = list(node.attrs["stride"])
        if "taps" in options and types[node.inputs[0]].shape[1] >= MIN_TAPS_CHANNELS:
            return "taps"
        if "depthwise_taps" in options and node.attrs["groups"] > 1:
            return "depthwise_taps" if stride == [1, 1] and ho * wo >= MIN_DEPTHWISE_PIXELS else options[0]
        if "batched_gemm" in options:
            return "batched_gemm" if ho * wo >= MIN_BATCHED_PIXELS else options[0]
        if "im2col" in options and node.attrs["groups"] == 1:
            return "im2col"
    return options[0]
