"""The one registry of op rules: for each IR op its shape rule, VJP rule and ONNX lowering, together.

An op family lives in one file of `ops/` and registers each op with `@register`; the ATen
ops the frontend meets are mapped onto IR ops by importers registered with `@aten(...)` in the
same file. A missing rule raises an error naming the op, never a KeyError.

VJP contract: `vjp(b, node, gouts, needs)` gets the builder, the forward node, one cotangent per
output (None where nothing flows back) and one `Need` per input (None where that input's gradient
is not wanted). It returns one gradient value per input, None where not needed, and must not build
gradient nodes for inputs whose need is None: that is how backprop stops below the earliest
trainable layer. A `Need` may ask for a slice of an input's gradient along one axis; an op lists in
`sliceable` the inputs for which it computes such a slice directly (cheaper), and for the others the
autodiff core computes the whole gradient and slices it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Protocol, Sequence

from pockprop.errors import CompileError
from pockprop.ir import Node, TensorType

if TYPE_CHECKING:  # pragma: no cover
    from pockprop.ops.builder import Builder


@dataclass(frozen=True)
class Need:
    """Which part of an input's gradient is wanted: all of it, or [start, stop) along `axis`."""

    axis: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def is_full(self) -> bool:
        return self.axis is None

    def sliced_type(self, t: TensorType) -> TensorType:
        if self.axis is None:
            return t
        shape = list(t.shape)
        shape[self.axis] = self.stop - self.start
        return TensorType(tuple(shape), t.dtype)


FULL = Need()


class Tag(enum.Enum):
    """What passes and the compiler may assume of an op, declared where the op is registered."""

    LAYER = "layer"  # inputs 1 and 2 are a layer's weight and bias (conv2d, linear, batch_norm): schemes
    HOISTABLE = "hoistable"  # a backward node of it reading only forward values may run in the forward
    # sweep when its output is no larger than its input (save_for_backward keeps it instead of the input)


class Lowering(Protocol):
    """What an op's ONNX lowering may use (emit/onnx.py's Emitter implements it)."""

    def type(self, value: str) -> TensorType: ...

    def node(self, op_type: str, inputs: Sequence[str | None], outputs: Sequence[str] | str | None = None,
             n_out: int = 1, **attrs: Any) -> Any: ...

    def const(self, value: Any, dtype: str = "float32", hint: str = "const") -> str: ...

    def ints(self, values: Iterable[int]) -> str: ...

    def onnx_dtype(self, dtype: str) -> int: ...

    def is_constant(self, value: str) -> bool: ...

    def is_used(self, value: str) -> bool: ...


class Op:
    """Base of every IR op. Subclasses set `name` and override the rules they have.

    Everything about an op is declared here, in its one file: shape rule, VJP rule, ONNX lowering,
    `tags`, `macs` (multiply-accumulates, for the compile report and the search's costs) and
    `bn_fold_rank` (the rank of the activation it feeds to a BatchNorm that `fold_frozen_batchnorm` may
    fold into its weight and bias; None: not foldable).
    """

    name: ClassVar[str] = ""
    sliceable: ClassVar[frozenset[int]] = frozenset()
    differentiable: ClassVar[bool] = True  # False: outputs carry no gradient (indices, masks, labels)
    tags: ClassVar[frozenset[Tag]] = frozenset()
    bn_fold_rank: ClassVar[int | None] = None
    # Alternative standard-ONNX lowerings of this op, by name, the first being the default. Every one
    # computes the same values (tests check each against the default); a node picks one with
    # attrs["lowering"] (passes/lowerings.py sets it, from a target profile or the cost model), and the
    # op's `lower` reads `lowering_of(node)`. Empty: the op has one lowering.
    lowerings: ClassVar[tuple[str, ...]] = ()

    def lowering_options(self, types: Mapping[str, TensorType], node: Node) -> tuple[str, ...]:
        """The lowerings valid for this node's shapes and attributes (a subset of `lowerings`, default first)."""
        return self.lowerings

    def shape(self, ins: list[TensorType | None], attrs: dict[str, Any]) -> list[TensorType]:
        raise NotImplementedError(f"op {self.name!r} has no shape rule")

    def vjp(self, b: "Builder", node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        raise CompileError(f"op {self.name!r} (module {node.module or '<top level>'}) has no gradient rule, "
                           "but a trainable tensor's gradient flows through it")

    def lower(self, e: Lowering, node: Node) -> None:
        raise CompileError(f"op {self.name!r} has no ONNX lowering")

    def macs(self, types: Mapping[str, TensorType], node: Node) -> int:
        """Multiply-accumulates of one application (0 for ops that are not products)."""
        return 0

    def weight_slice_axis(self, attrs: dict[str, Any], weight_shape: tuple[int, ...]) -> int | None:
        """For a LAYER op: the axis of its weight (input 1) that a channel-slice update cuts, the input-channel
        axis, so the weight gradient needs only that slice of the input activation; None: not sliceable."""
        return None


class InputGradOp(Op):
    """A backward helper whose output is the gradient of a forward input: shaped like attrs['input_shape']."""

    differentiable = False

    def shape(self, ins: list[TensorType | None], attrs: dict[str, Any]) -> list[TensorType]:
        assert ins[0] is not None
        return [TensorType(tuple(attrs["input_shape"]), ins[0].dtype)]


LOWERING = "lowering"  # the node attribute naming the chosen lowering


def lowering_of(node: Node) -> str | None:
    """The lowering chosen for `node`, None for its op's default."""
    return node.attrs.get(LOWERING)


def lowering_key(types: Mapping[str, TensorType], node: Node) -> str:
    """What a lowering's speed depends on, as a stable string: the op, its input types and its attributes
    (not the chosen lowering). Target profiles and the tuning cache are keyed by it."""
    ins = ",".join("-" if i is None else f"{types[i].dtype}{list(types[i].shape)}" for i in node.inputs)
    attrs = ",".join(f"{k}={node.attrs[k]}" for k in sorted(node.attrs) if k != LOWERING)
    return f"{node.op}({ins};{attrs})"


_OPS: dict[str, Op] = {}
ATEN: dict[str, Callable[..., Any]] = {}


def register(cls: type[Op]) -> type[Op]:
    if not cls.name or cls.name in _OPS:
        raise ValueError(f"op name {cls.name!r} empty or registered twice")
    _OPS[cls.name] = cls()
    return cls


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise CompileError(f"no rule for IR op {name!r}") from None


def all_ops() -> dict[str, Op]:
    return dict(_OPS)


def ops_tagged(tag: Tag) -> frozenset[str]:
    """Names of the ops that declare `tag`."""
    return frozenset(name for name, op in _OPS.items() if tag in op.tags)


def aten(*targets: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an importer for ATen overloads named like 'aten.convolution.default'.

    The importer is called as `fn(b, *args, **kwargs)` with fx argument nodes replaced by IR value
    names; it returns the IR value (or a list of values for multi-output ATen ops).
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for t in targets:
            if t in ATEN:
                raise ValueError(f"ATen importer for {t} registered twice")
            ATEN[t] = fn
        return fn

    return deco


def same_as_input(ins: list[TensorType | None], attrs: dict[str, Any]) -> list[TensorType]:
    """Shape rule of elementwise unary ops: y has x's type."""
    assert ins[0] is not None
    return [ins[0]]
