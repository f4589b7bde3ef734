"""Energy estimate of one training step: arithmetic plus memory traffic.

    E = MACs x E_MAC + bytes_moved x E_BYTE

Constants, from M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014
(45 nm, 0.9 V; the figures behind most edge-training energy estimates):
  E_MAC  = 4.6 pJ   a 32-bit float multiply (3.7 pJ) plus a 32-bit float add (0.9 pJ)
  E_BYTE = 160 pJ   a 32-bit DRAM access costs 640 pJ (1.3-2.6 nJ for 64 bits), i.e. 160 pJ per byte

MACs: forward + backward MACs of the training step (compiler/cost.py: conv, linear, matmul and their
gradients; elementwise work counts 0 MACs).

bytes_moved: every tensor an op of the optimized training graph reads or writes crosses DRAM once per
use, i.e. for each node the bytes of all its inputs (weights and other constants included) plus all
its outputs. That is the traffic of an executor with no on-chip reuse between ops (no fusion, no
caching): an upper bound, but one that moves exactly with what a scheme changes (which weights are
read again in backward, which activations are kept and re-read, which gradients are written).

Absolute joules on a real chip differ (newer nodes are cheaper, SRAM is ~50x cheaper than DRAM);
the estimate is for comparing schemes on one model, where the ratios are what matter.
"""
from __future__ import annotations

from typing import Any

from pockprop.passes.base import nbytes

from pockprop.ir import Graph

E_MAC = 4.6e-12  # J per fp32 multiply-accumulate (3.7 pJ mul + 0.9 pJ add)
E_BYTE = 160e-12  # J per byte of DRAM traffic (640 pJ per 32-bit access)
SOURCE = "Horowitz, ISSCC 2014, 45 nm: fp32 mul 3.7 pJ + add 0.9 pJ; 32-bit DRAM access 640 pJ"


def bytes_moved(g: Graph) -> int:
    """Bytes read plus written by the nodes of one training step (see the module docstring)."""
    total = 0
    for node in g.nodes:
        total += sum(nbytes(g.types[v]) for v in node.inputs if v is not None)
        total += sum(nbytes(g.types[v]) for v in node.outputs if v is not None)
    return total


def energy(macs: int, moved: int) -> dict[str, Any]:
    """Joules of one step from its MACs and bytes moved, with the split."""
    mac_j, mem_j = macs * E_MAC, moved * E_BYTE
    return {"joules": mac_j + mem_j, "mac_joules": mac_j, "memory_joules": mem_j, "macs": int(macs),
            "bytes": int(moved)}
