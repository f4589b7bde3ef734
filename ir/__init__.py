"""pockprop's IR: a flat, ordered list of nodes over named SSA values (see graph.py)."""
from pockprop.ir.graph import Graph, Node, TensorType

__all__ = ["Graph", "Node", "TensorType"]
