"""Graph -> Graph optimization passes over the pockprop IR, one small pass per file.

Passes return `PassResult(graph, changed)` and never mutate their input. `plan_memory` is an
analysis (Graph -> MemoryPlan), not a rewrite.
"""
from .base import PassResult
from .constant_folding import fold_constants
from .dce import eliminate_dead_code
from .fold_batchnorm import fold_frozen_batchnorm
from .memory_plan import MemoryPlan, plan_memory
from .reorder_updates import reorder_updates

__all__ = ["MemoryPlan", "PassResult", "eliminate_dead_code", "fold_constants", "fold_frozen_batchnorm",
           "plan_memory", "reorder_updates"]
