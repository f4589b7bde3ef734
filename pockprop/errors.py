"""Every error pockprop reports to a user: a leaf module (stdlib only), imported by the compiler and the device runtime.

They carry a message written for the user (op names, module paths, parameter names, file names), never a
stack trace. `pockprop.cli.main` maps each of them to its exit code below; anything else is an internal error.
"""
from __future__ import annotations

# The exit codes of the `pockprop` command (pockprop.cli.main is the one place that chooses them).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: the traceback is printed
EXIT_BAD_INPUT = 2  # arguments, model, artifact, checkpoint, data or an output path: one line says which
EXIT_TRAINING_FAILED = 3  # TrainingFailed: training diverged, or most of a round's steps were rejected
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_BROKEN_PIPE = 141  # stdout was closed early (`pockprop inspect A | head`): 128 + SIGPIPE, quietly


class UsageError(Exception):
    """The command line asks for something impossible: an option's value, a combination, an output path."""


class CompileError(Exception):
    """The model cannot be compiled as asked: unsupported ops, bad options, bad trainable patterns."""


class UnsupportedVariant(CompileError):
    """An importer met a supported op with an attribute combination we do not handle."""


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


class ArtifactError(Exception):
    """The artifact cannot be used: missing, truncated, tampered, contradictory or of an unknown version."""


class CheckpointError(ArtifactError):
    """A checkpoint cannot be written or read, or belongs to another artifact."""


class DataError(ValueError):
    """Training or inference data does not fit the model: wrong shape, dtype, labels or file format."""


class TrainingFailed(Exception):
    """Training went on but learned nothing usable: the state diverged, or most of a round's steps were
    rejected by the guard. No diverged state was saved: the last good checkpoint, if any, is unchanged."""


class RemoteError(Exception):
    """A part server refused a request (runtime.remote): another split or artifact, a stale or skipped step,
    a tensor of the wrong shape or dtype. `status` is the HTTP status, `code` the server's reason code
    (runtime.serve); the server changed nothing."""

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        self.status, self.code = status, code


class RemoteUnavailable(ConnectionError):
    """No answer from a part server after every retry (refused, reset, timed out): the step may or may
    not have been applied there; re-sending the same step number is safe (the server deduplicates)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, stopped at a consistent point; the message says what was saved (a KeyboardInterrupt, so
    whatever catches Ctrl-C catches it too)."""
