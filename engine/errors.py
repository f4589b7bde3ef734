"""Errors the compiler raises for the user's mistakes or gaps in our op coverage.

They carry a message written for the user (op names, module paths, parameter names), never a stack trace.
"""


class CompileError(Exception):
    """The model cannot be compiled as asked: unsupported ops, bad options, bad trainable patterns."""


class UnsupportedOpError(CompileError):
    """One or more ops in the traced model have no rule; `ops` maps op name -> module paths where it occurs."""

    def __init__(self, ops: dict[str, list[str]]):
        self.ops = ops
        lines = [f"{len(ops)} unsupported op(s) in the model:"]
        for op, paths in sorted(ops.items()):
            where = ", ".join(sorted(set(p or "<top level>" for p in paths))[:5])
            more = "" if len(set(paths)) <= 5 else f" (+{len(set(paths)) - 5} more)"
            lines.append(f"  - {op}  in module {where}{more}")
        lines.append("Supported ops are listed in docs/ops.md (`pockprop ops` prints them).")
        super().__init__("\n".join(lines))
