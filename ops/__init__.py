"""Op families; importing this package fills the registry (one file per family)."""
from pockprop.ops import conv, elementwise, linear, loss, norm, pool, reduce, shape  # noqa: F401
from pockprop.ops.registry import (ATEN, FULL, Lowering, Need, Op, Tag, all_ops, aten, get_op, ops_tagged,  # noqa: F401
                                   register)
