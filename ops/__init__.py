"""Op families; importing this package fills the registry (one file per family)."""
from pockprop.ops import conv, elementwise, linear, loss, norm, pool, reduce, shape  # noqa: F401
from pockprop.ops.registry import ATEN, FULL, Need, Op, all_ops, aten, get_op, register  # noqa: F401
