"""`pockprop bench`: time one training step of a pockprop artifact beside onnxruntime inference, PyTorch eager and
onnxruntime-training, each configuration in its own process, interleaved rounds. See docs/benchmarks.md.

Modules: cli (the subcommand's parser and run function), harness (compiles, drives the workers, tabulates),
worker (one configuration, run as a script, also under the peers' interpreter).
Benchmarks, never timed tests: tests/bench/test_bench.py only checks that the harness runs end to end.
"""
from __future__ import annotations

from pockprop.bench.harness import markdown_table, print_table, run, write_png

__all__ = ["run", "print_table", "markdown_table", "write_png"]
