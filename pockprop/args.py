"""Command-line pieces every `pockprop` subcommand shares (stdlib only: the device install imports it too).

- Argument types: each turns the text into a value or raises argparse.ArgumentTypeError saying what is
  allowed, so a bad number is reported as one line (`pockprop train: error: argument --lr: must be a finite
  number > 0, got 'nan'`) and exit code 2 before any work starts.
- Option groups used by several commands: the model spec (compile, search, bench), --threads, --json.
- Output-path checks, run before the work whose result they will receive.
- `Parser` and `HelpFormatter`: argparse errors become a UsageError (one line, exit 2, mapped in
  pockprop.cli.main), and an option's help shows its default once.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable

from pockprop.errors import UsageError

# Input tensors above this many elements are refused before torch allocates them (1 GiB of float32: far
# beyond what a device trains on, far below what makes the allocator abort).
MAX_INPUT_ELEMENTS = 2**28
MAX_DIMS = 8


def max_threads() -> int:
    """The most intra-op threads a command accepts: oversubscription beyond this only slows a run down (and
    tens of thousands of threads crash onnxruntime)."""
    return 4 * (os.cpu_count() or 1)


class ArgumentsError(UsageError):
    """argparse refused the command line; `prog` is the (sub)command it was parsing."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (one line, exit 2 in pockprop.cli.main), not printed with
    the usage and a SystemExit, and whose help shows defaults once (HelpFormatter); its subparsers are
    Parsers too."""

    def __init__(self, *args: Any, formatter_class: type = None, **kwargs: Any):  # type: ignore[assignment]
        super().__init__(*args, formatter_class=formatter_class or HelpFormatter, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentsError(self.prog, message)


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help when it has a value worth showing and the text does not
    already say its default (argparse's ArgumentDefaultsHelpFormatter adds it to every option, even
    after a "(default: ...)" of its own, and prints "(default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or "default" in text
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _got(text: str) -> str:
    return f"got {text!r}"


def integer(lo: int | None = None, hi: int | None = None, bounds: str | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (either bound optional; `bounds` words them instead)."""
    where = bounds or (f"from {lo} to {hi}" if lo is not None and hi is not None else
                       f">= {lo}" if lo is not None else f"<= {hi}")

    def parse(text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, {_got(text)}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {where}, {_got(text)}")
        return value
    return parse


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return "a finite number" + (" " + " and ".join(parts) if parts else "")


def _in_bounds(value: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    return (math.isfinite(value)
            and (lo is None or (value > lo if lo_open else value >= lo))
            and (hi is None or (value < hi if hi_open else value <= hi)))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float within the bounds (open or closed; NaN and infinities are refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, {_got(text)}") from None
        if not _in_bounds(value, lo, hi, lo_open, hi_open):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi, lo_open, hi_open)}, {_got(text)}")
        return value
    return parse


def numbers(count: int | None = None, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Callable[[str], list[float]]:
    """An argparse type: comma-separated finite floats (exactly `count` of them when given), each within bounds."""
    def parse(text: str) -> list[float]:
        items = [t.strip() for t in text.split(",")]
        try:
            values = [float(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, {_got(text)}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, {_got(text)}")
        if not all(_in_bounds(v, lo, hi, lo_open, hi_open) for v in values):
            raise argparse.ArgumentTypeError(f"each must be {_bounds(lo, hi, lo_open, hi_open)}, {_got(text)}")
        return values
    return parse


positive_int = integer(1)
non_negative_int = integer(0)
seed = integer(0, 2**63 - 1, ">= 0 and < 2**63")
fraction = number(0, 1, lo_open=True, hi_open=True)  # a share strictly between none and all
learning_rate = number(0, lo_open=True)
momentum = number(0, 1, hi_open=True)


def threads(text: str) -> int:
    """An argparse type: intra-op threads, 1 to 4 x the cores of this machine."""
    return integer(1, max_threads(), f"from 1 to {max_threads()} (4 x the {os.cpu_count() or 1} cores here)")(text)


def shape(text: str) -> tuple[int, ...]:
    """An argparse type: an input shape with its batch, like 8,3,128,128 (or 8x3x128x128)."""
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,3,128,128, {_got(text)}") from None
    if len(dims) > MAX_DIMS or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_DIMS} positive dimensions, {_got(text)}")
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise argparse.ArgumentTypeError(f"{math.prod(dims):,} elements; at most {MAX_INPUT_ELEMENTS:,} "
                                         f"(2**28) are allowed, {_got(text)}")
    return dims


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object, e.g. '{"width": 8}' (NaN and infinities are refused)."""
    def refuse(constant: str) -> float:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        value = json.loads(text, parse_constant=refuse)
    except ValueError as ex:
        raise argparse.ArgumentTypeError(f"not JSON ({ex}), {_got(text)}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 8}}', {_got(text)}")
    return value


# --- option groups -------------------------------------------------------------------------------------

def add_model_spec(p: argparse.ArgumentParser, *, option: bool = False, default: str | None = None,
                   metavar: str = "MODEL", help: str | None = None, input_shape: str | None = "the zoo model's",
                   num_classes: int | None = None, seed_help: str = "torch seed for the model's initial weights",
                   weights_help: str = "") -> None:
    """The model to build: MODEL (a positional, or --model with `option`), --num-classes, --model-kwargs,
    --weights, --seed and, unless `input_shape` (what its default is, in words) is None, --input-shape.
    tracing.loader.spec_of reads them."""
    what = help or ("models:NAME (zoo: mobilenet_v2, resnet18, resnet26, resnet50, mcunet, mlp) or "
                    "package.module:function returning an nn.Module")
    if option:
        p.add_argument("--model", default=default, metavar=metavar, help=what)
    else:
        p.add_argument("model", metavar=metavar, help=what)
    p.add_argument("--num-classes", type=positive_int, default=num_classes, help="passed to the model builder")
    p.add_argument("--model-kwargs", type=json_object, help='JSON builder kwargs, e.g. \'{"width": 8}\'')
    p.add_argument("--weights", help="pretrained weights to start from: a state_dict saved with safetensors"
                                     + weights_help)
    p.add_argument("--seed", type=seed, default=0, help=seed_help)
    if input_shape is not None:
        p.add_argument("--input-shape", type=shape,
                       help=f"input shape incl. batch, e.g. 8,3,128,128 (default: {input_shape})")


def add_threads(p: argparse.ArgumentParser, default: int | None = None,
                help: str = "onnxruntime intra-op threads") -> None:
    bound = f"1 to {max_threads()} (4 x cores)"
    p.add_argument("--threads", type=threads, default=default,
                   help=f"{help}, {bound}" + ("" if default is not None else " (default: all cores)"))


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


# --- output paths --------------------------------------------------------------------------------------

def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def check_output_file(path: str, flag: str) -> None:
    """UsageError unless a file can be written at `path` (replacing a file is fine, a folder is not)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; name the file to write")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: the folder {parent} does not exist")
    if not _writable_dir(parent) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def check_output_dir(path: str, flag: str) -> None:
    """UsageError unless `path` is a writable folder or can be created as one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is not a folder")
    if not _writable_dir(existing):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


def check_not_inside(path: str, artifact: str, flag: str) -> None:
    """UsageError if writing `path` would replace the artifact `artifact` or a file inside it."""
    out, art = os.path.realpath(path), os.path.realpath(artifact)
    if out == art or (os.path.isdir(art) and os.path.commonpath([out, art]) == art):
        raise UsageError(f"{flag} {path}: is inside the artifact {artifact}, which writing it would damage; "
                         "write somewhere else")
