"""pockprop's IR: a flat, ordered list of immutable nodes over named SSA values, with def-use (graph.py)."""
from pockprop.ir.graph import Graph, Node, Phase, Role, TensorType, module_of

__all__ = ["Graph", "Node", "Phase", "Role", "TensorType", "module_of"]
