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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pockprop.errors import CompileError
from pockprop.ir import Node, TensorType

if TYPE_CHECKING:  # pragma: no cover
    from pockprop.emit.onnx import Emitter
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


class Op:
    """Base of every IR op. Subclasses set `name` and override the rules they have."""

    name: ClassVar[str] = ""
    sliceable: ClassVar[frozenset[int]] = frozenset()
    differentiable: ClassVar[bool] = True  # False: outputs carry no gradient (indices, masks, labels)

    def shape(self, ins: list[TensorType | None], attrs: dict[str, Any]) -> list[TensorType]:
        raise NotImplementedError(f"op {self.name!r} has no shape rule")

    def vjp(self, b: "Builder", node: Node, gouts: list[str | None], needs: list[Need | None]) -> list[str | None]:
        raise CompileError(f"op {self.name!r} (module {node.module or '<top level>'}) has no gradient rule, "
                           "but a trainable tensor's gradient flows through it")

    def lower(self, e: "Emitter", node: Node) -> None:
        raise CompileError(f"op {self.name!r} has no ONNX lowering")


class InputGradOp(Op):
    """A backward helper whose output is the gradient of a forward input: shaped like attrs['input_shape']."""

    differentiable = False

    def shape(self, ins: list[TensorType | None], attrs: dict[str, Any]) -> list[TensorType]:
        assert ins[0] is not None
        return [TensorType(tuple(attrs["input_shape"]), ins[0].dtype)]


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
