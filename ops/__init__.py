"""Op families; importing this package fills the registry (one file per family)."""
from pockprop.ops import (attention, compare, conv, distill, dtype, elementwise, index, linear, loss, norm, pool, reduce,  # noqa: F401
                          shape, softmax)
from pockprop.ops.registry import (ATEN, FULL, Lowering, Need, Op, Tag, all_ops, aten, get_op, ops_tagged,  # noqa: F401
                                   register)
