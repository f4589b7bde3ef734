"""Op families; importing this package fills the registry (one file per family)."""
from pockprop.ops import (attention, compare, conv, conv_grad, distill, dtype, elementwise, index, linear, loss,  # noqa: F401
                          norm, pool, reduce, shape, softmax)
from pockprop.ops.registry import (ATEN, FULL, Lowering, Need, Op, Tag, all_ops, aten, get_op, ops_tagged,  # noqa: F401
                                   register)
