"""`pockprop bench`: time one training step of a pockprop artifact beside onnxruntime inference, PyTorch eager
and onnxruntime-training, each configuration in its own process, interleaved rounds. See docs/benchmarks.md.

Benchmarks, never timed tests: tests/bench/test_bench.py only checks that the harness runs end to end.
"""
from __future__ import annotations

import argparse
import json
import sys

from pockprop.bench.harness import markdown_table, print_table, run, write_png

__all__ = ["bench_command", "run", "print_table", "markdown_table", "write_png"]


def bench_command(args: argparse.Namespace) -> int:
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))  # noqa: E731
    try:
        result = run(args, log=log)
    except (ValueError, KeyError) as ex:
        print(f"pockprop bench: error: {ex}", file=sys.stderr)
        return 2
    except Exception as ex:  # CompileError and friends
        if type(ex).__name__ == "CompileError":
            print(f"pockprop bench: error: {ex}", file=sys.stderr)
            return 2
        raise
    print_table(result)
    if args.png:
        why = write_png(result, args.png)
        result["png"] = None if why else args.png
        if why:
            result["png_skipped"] = why
            print(f"note: {why}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
