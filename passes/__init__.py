"""Graph -> Graph optimization passes over the pockprop IR, one small pass per file.

Passes return `PassResult(graph, changed)` and never mutate their input. `plan_memory` is an
analysis (Graph -> MemoryPlan), not a rewrite.
"""
from pockprop.passes.base import PassResult
from pockprop.passes.constant_folding import fold_constants
from pockprop.passes.dce import eliminate_dead_code
from pockprop.passes.fold_batchnorm import fold_frozen_batchnorm
from pockprop.passes.memory_plan import MemoryPlan, plan_memory
from pockprop.passes.reorder_updates import reorder_updates

__all__ = ["MemoryPlan", "PassResult", "eliminate_dead_code", "fold_constants", "fold_frozen_batchnorm",
           "plan_memory", "reorder_updates"]
