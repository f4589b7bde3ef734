"""The op families transformers need, against torch.autograd through the emitted ONNX on onnxruntime.

One table of (name, function, maker) drives one parametrized `check_vjp`; a maker draws the case's
shapes from a seeded generator (so each seed is another shape, 0-d and 1-d cases included) and returns
the arguments: float tensors are trained, integer and bool tensors (indices, masks) are fed as data.
Ops without a gradient (comparisons, logical ops, casts to integers) are checked through a float
product, so their forward values decide the result.
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from pockprop.autodiff.gradcheck import check_vjp
from pockprop.compiler.compile import compile
from pockprop.errors import UnsupportedOpError, UnsupportedVariant
from pockprop.ir import Graph, TensorType
from pockprop.ops import ATEN
from pockprop.ops.builder import Builder
from pockprop.tracing.trace import trace

Maker = Callable[[torch.Generator], list[torch.Tensor]]


def _dim(gen: torch.Generator, lo: int = 1, hi: int = 5) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _floats(*shapes: Callable[[torch.Generator], tuple[int, ...]], scale: float = 1.0, pos: bool = False) -> Maker:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        out = [_randn(gen, *s(gen)) * scale for s in shapes]
        return [t.abs() + 0.5 for t in out] if pos else out
    return make


def rank(r: int) -> Callable[[torch.Generator], tuple[int, ...]]:
    return lambda gen: tuple(_dim(gen) for _ in range(r))


def _ln(affine: bool, lead: int, norm: int) -> Maker:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        ns = rank(norm)(gen)
        x = _randn(gen, *rank(lead)(gen), *ns) * 2 + 1
        return [x, _randn(gen, *ns), _randn(gen, *ns)] if affine else [x]
    return make


def _layer_norm(x: torch.Tensor, *wb: torch.Tensor, norm: int = 1) -> torch.Tensor:
    return F.layer_norm(x, x.shape[x.dim() - norm:], *wb, eps=1e-5)


def _native_ln_stats(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], w, b, 1e-5)
    return y + mean * 2 - rstd * 0.5  # every output reaches the loss; torch differentiates y only


def _embedding_case(pad: bool) -> Maker:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        v, d = _dim(gen, 3, 6), _dim(gen, 1, 4)
        idx = torch.randint(0, v, (_dim(gen, 1, 3), _dim(gen, 2, 6)), generator=gen)
        idx[0, 0] = idx[0, -1]  # a repeated row: its gradients add up
        if pad:
            idx[-1, 0] = 1
        return [_randn(gen, v, d), idx]
    return make


def _index_case(axis: int, idx_rank: int = 1, negative: bool = False) -> Maker:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        shape = [_dim(gen, 2, 4) for _ in range(3)]
        idx = torch.randint(-shape[axis] if negative else 0, shape[axis], (_dim(gen, 1, 4),) * idx_rank, generator=gen)
        return [_randn(gen, *shape), idx]
    return make


def _multi_index_case(gen: torch.Generator) -> list[torch.Tensor]:
    shape = [_dim(gen, 2, 4) for _ in range(3)]
    n = _dim(gen, 1, 4)
    return [_randn(gen, *shape)] + [torch.randint(0, s, (n,), generator=gen) for s in shape]


def _gather_case(gen: torch.Generator) -> list[torch.Tensor]:
    a, b, c = _dim(gen, 2, 4), _dim(gen, 2, 5), _dim(gen, 1, 3)
    return [_randn(gen, a, b, c), torch.randint(0, b, (a, _dim(gen, 1, 6), c), generator=gen)]


def _masked(shape_fn: Callable[[torch.Generator], tuple[int, ...]], n_floats: int = 1) -> Maker:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        shape = shape_fn(gen)
        return [_randn(gen, *shape) for _ in range(n_floats)] + [torch.rand(shape[-1:], generator=gen) > 0.5]
    return make


def _attention(mask: str) -> Maker:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        n, h, t, s, d = _dim(gen, 1, 2), _dim(gen, 1, 3), _dim(gen, 2, 5), _dim(gen, 2, 5), _dim(gen, 2, 6)
        qkv = [_randn(gen, n, h, t, d), _randn(gen, n, h, s, d), _randn(gen, n, h, s, d)]
        if mask == "float":
            return qkv + [_randn(gen, n, 1, t, s)]
        if mask == "bool":
            m = torch.rand(n, 1, t, s, generator=gen) > 0.4
            m[..., 0, :] = False  # a fully masked row: the safe softmax gives 0 there, not NaN
            return qkv + [m]
        return qkv
    return make


def _gqa(gen: torch.Generator) -> list[torch.Tensor]:
    n, kv, rep, t, d = _dim(gen, 1, 2), _dim(gen, 1, 2), _dim(gen, 2, 3), _dim(gen, 2, 5), _dim(gen, 2, 4)
    return [_randn(gen, n, kv * rep, t, d), _randn(gen, n, kv, t + 1, d), _randn(gen, n, kv, t + 1, d)]


def _safe_softmax_case(gen: torch.Generator) -> list[torch.Tensor]:
    x = _randn(gen, _dim(gen, 2, 4), _dim(gen, 2, 5))
    x[0] = -math.inf  # a dead row
    x[1, 0] = -math.inf
    return [x]


def _split_case(gen: torch.Generator) -> list[torch.Tensor]:
    return [_randn(gen, _dim(gen, 1, 3), _dim(gen, 4, 7), _dim(gen, 1, 3))]


def _compare_case(gen: torch.Generator) -> list[torch.Tensor]:
    shape = rank(2)(gen)
    return [_randn(gen, *shape), _randn(gen, shape[-1]), torch.randint(-2, 3, shape, generator=gen)]


def _cmp_all(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Every comparison, Tensor and Scalar overloads, float/int operands mixed."""
    masks = [x > y, x >= 0.1, x < y, x <= -0.2, x == x, x != y, k == 1, k != 0, k > 0.5, k <= x, k.eq(y.long())]
    return sum(m.float() * (i + 1) for i, m in enumerate(masks)) * x + y


def _logical_all(x: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    a, b = x > 0, y > 0
    masks = [a & b, a | b, a ^ b, ~a, torch.logical_not(k), torch.logical_and(k, a), torch.logical_or(x, k),
             torch.logical_xor(a, k > 0)]
    return sum(m.float() * (i + 1) for i, m in enumerate(masks)) * x + y


def _any_all(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x * ((x > 0).any(-1, keepdim=True).float() + (x > -1).all(-1, keepdim=True).float() * 2
                + (x > 0.5).any().float() + m.any(-1).float() * 3)


def _any_empty(gen: torch.Generator) -> list[torch.Tensor]:
    n = _dim(gen)
    return [_randn(gen, n, 1), torch.zeros(n, 0, dtype=torch.bool)]


def _casts(x: torch.Tensor, k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """float -> int truncates toward 0; int/bool -> float; float -> float16 -> float carries the gradient."""
    return (x * 3).long().float() * x + k.float() * x + m.float() + x.half().float() * 2 + (x > 0).int() * x \
        + k.bool().float() + x.bool().float()


def _ints_and_mask(shape_fn: Callable[[torch.Generator], tuple[int, ...]]) -> Maker:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        shape = shape_fn(gen)
        return [_randn(gen, *shape), torch.randint(-2, 3, shape, generator=gen), torch.rand(shape, generator=gen) > 0.5]
    return make


def _gelu_new(x: torch.Tensor) -> torch.Tensor:  # GPT-2's "gelu_new", written out as transformers does
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # Llama's RMSNorm, as transformers writes it
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _rotary(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * t.cos() + rot * t.sin()


def _vector_and(shape_fn: Callable[[torch.Generator], tuple[int, ...]]) -> Maker:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        shape = shape_fn(gen)
        return [_randn(gen, *shape), _randn(gen, *shape[-1:])]
    return make


def _rotary_case(gen: torch.Generator) -> list[torch.Tensor]:
    shape = (_dim(gen), _dim(gen), 2 * _dim(gen, 1, 3))
    return [_randn(gen, *shape), _randn(gen, *shape) * 3]


_sdpa_mask = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731

# name, fn, maker
CASES: list[tuple[str, Callable[..., torch.Tensor], Maker]] = [
    ("softmax_last", lambda x: F.softmax(x, -1), _floats(rank(3), scale=3)),
    ("softmax_dim0", lambda x: F.softmax(x, 0), _floats(rank(2), scale=3)),
    ("softmax_1d", lambda x: F.softmax(x, 0), _floats(rank(1), scale=3)),
    ("softmax_0d", lambda x: F.softmax(x, 0) * x, _floats(rank(0))),
    ("log_softmax", lambda x: F.log_softmax(x, 1), _floats(rank(3), scale=3)),
    ("log_softmax_1d", lambda x: F.log_softmax(x, -1), _floats(rank(1), scale=3)),
    ("safe_softmax", lambda x: torch._safe_softmax(x, -1), _safe_softmax_case),
    ("layer_norm", _layer_norm, _ln(True, 2, 1)),
    ("layer_norm_2axes", lambda x, w, b: _layer_norm(x, w, b, norm=2), _ln(True, 1, 2)),
    ("layer_norm_plain", _layer_norm, _ln(False, 2, 1)),
    ("layer_norm_1d", _layer_norm, _ln(True, 0, 1)),
    ("layer_norm_stats", _native_ln_stats, _ln(True, 2, 1)),
    ("rms_norm_llama", _rms_norm, _vector_and(rank(3))),
    ("rms_norm_torch", lambda x, w: F.rms_norm(x, x.shape[-1:], w, 1e-6), _vector_and(rank(3))),
    ("rsqrt", torch.rsqrt, _floats(rank(2), pos=True)),
    ("rsqrt_0d", torch.rsqrt, _floats(rank(0), pos=True)),
    ("cos_sin", lambda x: x.cos() * 2 + x.sin(), _floats(rank(2), scale=3)),
    ("cos_sin_0d", lambda x: x.cos() + x.sin(), _floats(rank(0))),
    ("rotary", _rotary, _rotary_case),
    ("erf", torch.erf, _floats(rank(2), scale=2)),
    ("gelu_new", _gelu_new, _floats(rank(2), scale=3)),
    ("cumsum", lambda x: x.cumsum(1), _floats(rank(3))),
    ("cumsum_1d", lambda x: x.cumsum(-1), _floats(rank(1))),
    ("cumsum_ints", lambda x, k, m: x * (k.cumsum(-1) + m.cumsum(-1)).float(), _ints_and_mask(rank(2))),
    ("embedding", lambda w, i: F.embedding(i, w), _embedding_case(False)),
    ("embedding_padding", lambda w, i: F.embedding(i, w, padding_idx=1), _embedding_case(True)),
    ("embedding_0d_index", lambda w, i: F.embedding(i[0, 0], w), _embedding_case(False)),
    ("index_axis0", lambda x, i: x[i], _index_case(0)),
    ("index_axis1_2d", lambda x, i: x[:, i], _index_case(1, idx_rank=2)),
    ("index_axis2_negative", lambda x, i: x[..., i], _index_case(2, negative=True)),
    ("index_leading_pair", lambda x, i, j, k: x[i, j], _multi_index_case),
    ("index_inner_pair", lambda x, i, j, k: x[:, j, k], _multi_index_case),
    ("index_split_pair", lambda x, i, j, k: x[i, :, k], _multi_index_case),
    ("index_triple", lambda x, i, j, k: x[i, j, k], _multi_index_case),
    ("gather", lambda x, i: torch.gather(x, 1, i), _gather_case),
    ("where", lambda a, b, m: torch.where(m, a, b), _masked(rank(2), 2)),
    ("where_broadcast", lambda a, b, m: torch.where(m, a, b[0]), _masked(rank(3), 2)),
    ("where_scalar", lambda a, m: torch.where(m, a, 0.5) + torch.where(m, -1.0, a), _masked(rank(2))),
    ("masked_fill", lambda a, m: a.masked_fill(m, -1e9).softmax(-1), _masked(rank(2))),
    ("compare", _cmp_all, _compare_case),
    ("logical", _logical_all, _compare_case),
    ("any_all", _any_all, _masked(rank(2))),
    ("any_empty_axis", lambda x, m: x * m.any(-1, keepdim=True).float() + x * m.all(-1, keepdim=True).float(), _any_empty),
    ("argmax_argmin", lambda x, k, m: x * (x.argmax(-1, keepdim=True) + x.argmin(0) + x.argmax() + k.argmin(-1, keepdim=True)
                                          + m.int().argmax(-1, keepdim=True)).float(), _ints_and_mask(rank(2))),
    ("casts", _casts, _ints_and_mask(rank(2))),
    ("casts_0d", _casts, _ints_and_mask(rank(0))),
    ("full_like", lambda x: x * torch.full_like(x, 2.5) + torch.zeros_like(x) + torch.ones_like(x), _floats(rank(2))),
    ("full", lambda x: x * torch.full(x.shape, 2) + torch.full(x.shape[-1:], True).float() + torch.full((), 0.5),
     _floats(rank(2))),
    ("arange", lambda x: x * torch.arange(x.shape[-1]) + torch.arange(1, 2 * x.shape[-1], 2).float(), _floats(rank(2))),
    ("split", lambda x: torch.split(x, 2, dim=1)[1] * torch.split(x, 2, dim=1)[0], _split_case),
    ("split_with_sizes", lambda x: sum(p.sum(1) * (i + 1) for i, p in enumerate(torch.split(x, [1, 3, x.shape[1] - 4], 1))),
     _split_case),
    ("chunk", lambda x: torch.cat(x.chunk(3, dim=1)[::-1], dim=1), _split_case),
    ("sdpa", F.scaled_dot_product_attention, _attention("none")),
    ("sdpa_float_mask", _sdpa_mask, _attention("float")),
    ("sdpa_bool_mask", _sdpa_mask, _attention("bool")),
    ("sdpa_causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), _attention("none")),
    ("sdpa_gqa_scale", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True), _gqa),
    ("sdpa_broadcast_batch", lambda q, k, v, m: F.scaled_dot_product_attention(q[:1], k, v, attn_mask=m),
     _attention("bool")),
]


# two draws of shapes per case; a 0-d case has one shape, so one draw
RUNS = [(*case, seed) for case in CASES for seed in ((0,) if case[0].endswith("_0d") else (0, 1))]


@pytest.mark.parametrize("name,fn,make,seed", RUNS, ids=[f"{c[0]}-{c[3]}" for c in RUNS])
def test_vjp_matches_torch(name: str, fn: Callable[..., torch.Tensor], make: Maker, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed * 1000 + len(name))
    check_vjp(fn, *make(gen), seed=seed)


def _ops_of(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> list[str]:
    class M(torch.nn.Module):
        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return fn(*xs)

    return [n.op for n in trace(M(), tensors).graph.nodes]


def test_attention_and_safe_softmax_stay_one_op() -> None:
    """SDPA is one `attention` op, and torch's five-op safe-softmax decomposition (eq, not, any, full_like,
    where) is one `safe_softmax`."""
    q, m = torch.randn(1, 2, 4, 8), torch.rand(1, 1, 4, 4) > 0.5
    ops = _ops_of(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m), q, m)
    assert ops.count("attention") == 1 and not {"any", "eq", "logical_not", "safe_softmax", "matmul"} & set(ops)
    assert _ops_of(lambda x: torch._safe_softmax(x, -1), q) == ["safe_softmax"]


def test_layer_norm_statistics_are_emitted_only_where_read() -> None:
    """Inference reads y alone; the training step's VJP reads mean and rstd from the same LayerNormalization."""
    ln = torch.nn.LayerNorm(6)
    art = compile(torch.nn.Sequential(ln, torch.nn.Linear(6, 2)), (torch.randn(3, 6),), loss="mse")
    outputs = {m: [len(n.output) for n in model.graph.node if n.op_type == "LayerNormalization"]
               for m, model in (("infer", art.infer_model), ("train", art.train_model))}
    assert outputs == {"infer": [1], "train": [3]}


def test_bitwise_ops_on_integers_are_refused_with_the_op_named() -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(1, 1)

        def forward(self, k: torch.Tensor) -> torch.Tensor:
            return self.fc((k & (k + 1)).float()[..., None])

    with pytest.raises(UnsupportedOpError) as info:
        compile(M(), (torch.arange(6),), loss="mse")
    assert "aten.bitwise_and.Tensor (bitwise ops on integers need ONNX opset 18" in str(info.value)


def test_boolean_mask_index_is_refused() -> None:
    """torch.export turns x[mask] into data-dependent shape ops; were a bool index to reach the importer,
    it is refused rather than emitted as a Gather onnxruntime cannot load."""
    g = Graph()
    b = Builder(g)
    x, m = g.add_input("x", TensorType((4,), "float32")), g.add_input("m", TensorType((4,), "bool"))
    with pytest.raises(UnsupportedVariant, match="boolean mask indexing"):
        ATEN["aten.index.Tensor"](b, x, [m])


def test_embedding_gradient_refuses_scale_grad_by_freq() -> None:
    emb = torch.nn.Embedding(5, 3, scale_grad_by_freq=True)
    with pytest.raises(UnsupportedOpError) as info:
        compile(torch.nn.Sequential(emb, torch.nn.Flatten()), (torch.tensor([[1, 2]]),), loss="mse")
    assert "aten.embedding.default (scale_grad_by_freq=True" in str(info.value) and "in module 0" in str(info.value)
