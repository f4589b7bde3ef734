"""The `pockprop` command: assembles the subcommands and maps what they raise to exit codes.

Each subsystem owns its parsers and run functions: runtime.commands (train, eval, export, inspect, pack),
runtime.plot (plot), runtime.tune (tune), runtime.serve (serve), runtime.split_cli (split-train),
runtime.simulate (fleet), compiler.cli (compile, ops), search.cli (search), bench.cli (bench). Their modules
import without torch (the compiler loads inside the run functions), so the device install, numpy and
onnxruntime only, runs every device subcommand and answers a compiler one by naming the extra to install.

Exit codes (pockprop.errors): 0 ok; 2 bad input (arguments, model, artifact, checkpoint, data, a file
that cannot be read or written): one line on stderr; 3 training failed (diverged, or most steps rejected):
one line; 1 internal error: the traceback; 130 Ctrl-C: one line saying what was saved; 141 stdout closed
early (`| head`): nothing more is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable

from pockprop import __version__
from pockprop.args import ArgumentsError, Parser
from pockprop.bench import cli as bench_cli
from pockprop.compiler import cli as compiler_cli
from pockprop.errors import (EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TRAINING_FAILED,
                             ArtifactError, CompileError, DataError, RemoteError, TrainingFailed, UsageError)
from pockprop.runtime import commands as runtime_commands, plot as runtime_plot, serve as runtime_serve, \
    simulate as runtime_simulate, tune as runtime_tune
from pockprop.runtime import split_cli as runtime_split
from pockprop.search import cli as search_cli

# What a user can cause and fix: one line, exit 2. An OSError names a file the system refused (missing,
# permissions, disk full) or a server that does not answer, which is the user's environment, not our bug.
USER_ERRORS = (UsageError, CompileError, ArtifactError, DataError, RemoteError, OSError)
COMPILE_EXTRA = {"torch", "onnx", "yaml"}  # what `pip install 'pockprop[compile]'` adds to the device install


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pockprop", description="Compile-ahead sparse training for edge devices.")
    parser.add_argument("--version", action="version", version=f"pockprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # subcommands are Parsers too
    for add in (compiler_cli.add_parser, search_cli.add_parser, bench_cli.add_parser, runtime_commands.add_parser,
                runtime_plot.add_parser, runtime_tune.add_parser, runtime_serve.add_parser,
                runtime_split.add_parser, runtime_simulate.add_parser):
        add(sub)
    return parser


def _fail(args: argparse.Namespace | None, command: str, code: int, message: str) -> int:
    print(f"{command}: {message}", file=sys.stderr)
    if args is not None and getattr(args, "json", None) is True:  # the device commands' --json flag
        print(json.dumps({"ok": False, "exit_code": code, "error": message}))
    return code


def _internal(args: argparse.Namespace, command: str, ex: BaseException) -> int:
    traceback.print_exc()
    return _fail(args, command, EXIT_INTERNAL, f"internal error: {type(ex).__name__}: {ex} (please report it)")


def _os_error(ex: OSError) -> str:
    if ex.filename is not None and ex.strerror:
        return f"{ex.filename}: {ex.strerror}"
    return ex.strerror or str(ex)


def _stdout_closed() -> int:
    """The reader of stdout went away (`pockprop inspect A | head`): exit as a Unix tool killed by SIGPIPE
    would, saying nothing, and point stdout at /dev/null so the interpreter's final flush is quiet too."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except ArgumentsError as ex:
            return _fail(None, ex.prog, EXIT_BAD_INPUT, f"error: {ex} (see `{ex.prog} --help`)")
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return _dispatch(args, f"pockprop {args.command}")
    except BrokenPipeError:  # from the command's output, --help, or _fail's --json line
        return _stdout_closed()


def _dispatch(args: argparse.Namespace, command: str) -> int:
    """Run the command; what it raises becomes one line (or a traceback) and an exit code."""
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:
        raise  # stdout is gone: main's, before OSError below (bad input)
    except KeyboardInterrupt as ex:  # runtime's Interrupted says what it saved
        return _fail(args, command, EXIT_INTERRUPTED, f"interrupted: {ex}" if str(ex) else "interrupted")
    except TrainingFailed as ex:
        return _fail(args, command, EXIT_TRAINING_FAILED, f"failed: {ex}")
    except ModuleNotFoundError as ex:
        if (ex.name or "").split(".")[0] not in COMPILE_EXTRA:
            return _internal(args, command, ex)
        return _fail(args, command, EXIT_BAD_INPUT, f"needs {ex.name}; install the compiler with "
                                                    "`pip install 'pockprop[compile]'`")
    except USER_ERRORS as ex:
        return _fail(args, command, EXIT_BAD_INPUT, f"error: {_os_error(ex) if isinstance(ex, OSError) else ex}")
    except Exception as ex:  # noqa: BLE001 - anything else is our bug: show where
        return _internal(args, command, ex)


if __name__ == "__main__":
    sys.exit(main())
