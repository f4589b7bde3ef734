"""The assembled `pockprop` command: --version, help text, argument types, and the one mapping from
errors to exit codes (0 ok, 1 internal with a traceback, 2 bad input in one line, 130 interrupted)."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pockprop
from pockprop import args as cli_args
from pockprop.cli import build_parser, main
from pockprop.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK

ROOT = Path(__file__).resolve().parents[2]


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "pockprop", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == EXIT_OK and out.stdout.strip() == f"pockprop {pockprop.__version__}" == "pockprop 0.1.0"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_is_assembled() -> None:
    assert set(_subparsers()) == {"compile", "ops", "search", "bench", "train", "eval", "export", "inspect", "pack",
                                  "plot", "tune", "serve", "split-train", "fleet"}


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_shows_each_default_once(command: str) -> None:
    text = _subparsers()[command].format_help()
    assert "(default: None)" not in text
    # one entry per option: from its flags to the next option's flags
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for entry in entries:
        assert entry.count("default") <= 1, entry
    assert "(default: False)" not in text and "(default: True)" not in text


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pockprop train: error: the following arguments are required")
    assert main(["nope"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("pockprop: error: argument COMMAND: invalid choice: 'nope'")


@pytest.mark.parametrize("kind,code,needle", [
    (KeyboardInterrupt, EXIT_INTERRUPTED, "pockprop pack: interrupted"),
    (lambda: OSError(28, "/x/m.pockprop: cannot write (disk full)"), EXIT_BAD_INPUT,
     "pockprop pack: error: /x/m.pockprop: cannot write (disk full)"),
    (lambda: PermissionError(13, "Permission denied", "/x/m.pockprop"), EXIT_BAD_INPUT,
     "pockprop pack: error: /x/m.pockprop: Permission denied"),
    (lambda: ModuleNotFoundError("No module named 'torch'", name="torch"), EXIT_BAD_INPUT,
     "pip install 'pockprop[compile]'"),
    (lambda: ZeroDivisionError("boom"), EXIT_INTERNAL, "internal error: ZeroDivisionError: boom"),
])
def test_errors_map_to_exit_codes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                  kind, code: int, needle: str) -> None:
    def raising(args: argparse.Namespace) -> int:
        raise kind()

    parser = build_parser()
    monkeypatch.setattr("pockprop.cli.build_parser", lambda: parser)
    _subparsers_of(parser)["pack"].set_defaults(func=raising)
    assert main(["pack", str(tmp_path), "-o", str(tmp_path / "m.pockprop")]) == code
    err = capsys.readouterr().err
    assert needle in err
    if code == EXIT_INTERNAL:
        assert "Traceback" in err
    else:
        assert err.count("\n") == 1 and "Traceback" not in err


def _subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# --- every number on every command line is bounded --------------------------------------------------------

def test_no_option_takes_a_bare_int_or_float() -> None:
    for name, parser in _subparsers().items():
        for action in parser._actions:
            assert action.type not in (int, float), f"pockprop {name} {action.option_strings}: unbounded {action.type}"


# The positional and required arguments are placeholders: argparse refuses the number before any is used.
REQUIRED = {"compile": ["models:mlp", "-o", "/nonexistent/out"], "search": ["models:mlp", "--data", "/nonexistent"],
            "bench": [], "train": ["/nonexistent", "--data", "/nonexistent"], "eval": ["/nonexistent", "--data", "x"],
            "export": ["/nonexistent", "-o", "/nonexistent/m.onnx"], "inspect": ["/nonexistent"]}
T = "must be an integer from 1 to"


@pytest.mark.parametrize("command,argv,needle", [
    # issue 10, item 8 and item 9
    ("train", ["--threads", "100000"], f"argument --threads: {T}"),
    ("train", ["--min-lr", "-1"], "argument --min-lr: must be a finite number >= 0, got '-1'"),
    ("train", ["--gamma", "nan"], "argument --gamma: must be a finite number > 0, got 'nan'"),
    ("compile", ["--weight-decay", "nan"], "argument --weight-decay: must be a finite number >= 0, got 'nan'"),
    ("compile", ["--betas", "1.5,0.9"], "argument --betas: each must be a finite number >= 0 and < 1, got '1.5,0.9'"),
    ("compile", ["--betas", "2,abc"], "argument --betas: expected comma-separated numbers, got '2,abc'"),
    ("compile", ["--eps", "0"], "argument --eps: must be a finite number > 0, got '0'"),
    ("compile", ["--num-classes", "0"], "argument --num-classes: must be an integer >= 1, got '0'"),
    ("train", ["--checkpoint-every", "-1"], "argument --checkpoint-every: must be an integer >= 0, got '-1'"),
    ("compile", ["--input-shape", ""], "argument --input-shape: expected comma-separated integers like 8,3,128,128"),
    ("compile", ["--input-shape", "100000,3,10000,10000"], "30,000,000,000,000 elements; at most 268,435,456"),
    ("compile", ["--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
    ("train", ["--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
    # every other numeric flag
    ("compile", ["--momentum", "1.5"], "argument --momentum: must be a finite number >= 0 and < 1"),
    ("compile", ["--label-smoothing", "nan"], "argument --label-smoothing: must be a finite number >= 0 and < 1"),
    ("compile", ["--seed", "-1"], "argument --seed: must be an integer >= 0 and < 2**63"),
    ("compile", ["--model-kwargs", "[1]"], "argument --model-kwargs: expected a JSON object"),
    ("search", ["--val-fraction", "1"], "argument --val-fraction: must be a finite number > 0 and < 1"),
    ("search", ["--epochs", "nan"], "argument --epochs: must be a finite number > 0"),
    ("search", ["--batch", "0"], "argument --batch: must be an integer >= 1"),
    ("search", ["--steps", "-2"], "argument --steps: must be an integer >= 1"),
    ("search", ["--repeats", "0"], "argument --repeats: must be an integer >= 1"),
    ("search", ["--max-layers", "0"], "argument --max-layers: must be an integer >= 1"),
    ("search", ["--budget-ms", "-5"], "argument --budget-ms: must be a finite number > 0"),
    ("search", ["--threads", "0"], f"argument --threads: {T}"),
    ("search", ["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    ("search", ["--momentum", "-0.5"], "argument --momentum: must be a finite number >= 0 and < 1"),
    ("search", ["--input-shape", "4,0"], "argument --input-shape: expected 1 to 8 positive dimensions"),
    ("search", ["--preprocess", "{nope"], "--preprocess '{nope': not a preset (imagenet, unit, none) nor JSON"),
    ("bench", ["--rounds", "0"], "argument --rounds: must be an integer >= 1"),
    ("bench", ["--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    ("bench", ["--steps", "0"], "argument --steps: must be an integer >= 1"),
    ("bench", ["--threads", "100000"], f"argument --threads: {T}"),
    ("bench", ["--batch", "0"], "argument --batch: must be an integer >= 1"),
    ("bench", ["--resolution", "-8"], "argument --resolution: must be an integer >= 1"),
    ("bench", ["--num-classes", "0"], "argument --num-classes: must be an integer >= 1"),
    ("bench", ["--lr", "-1"], "argument --lr: must be a finite number > 0"),
    ("train", ["--epochs", "1.5"], "argument --epochs: expected an integer, got '1.5'"),
    ("train", ["--batch", "0"], "argument --batch: must be an integer >= 1"),
    ("train", ["--warmup-steps", "-3"], "argument --warmup-steps: must be an integer >= 0"),
    ("train", ["--step-size", "-1"], "argument --step-size: must be an integer >= 0"),
    ("train", ["--holdout", "1"], "argument --holdout: must be a finite number >= 0 and < 1"),
    ("train", ["--seed", "-1"], "argument --seed: must be an integer >= 0"),
    ("eval", ["--threads", "100000"], f"argument --threads: {T}"),
    ("export", ["--threads", "-1"], f"argument --threads: {T}"),
    ("inspect", ["--threads", "1e3"], "argument --threads: expected an integer"),
])
def test_bad_numbers_are_one_line_before_any_work(capsys: pytest.CaptureFixture[str], command: str, argv: list[str],
                                                 needle: str) -> None:
    assert main([command, *REQUIRED[command], *argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"pockprop {command}: error: ") and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


# --- argument types -------------------------------------------------------------------------------------

@pytest.mark.parametrize("parse,text,value", [
    (cli_args.positive_int, "3", 3), (cli_args.non_negative_int, "0", 0), (cli_args.fraction, "0.25", 0.25),
    (cli_args.learning_rate, "1e-3", 1e-3), (cli_args.shape, "8,3,32,32", (8, 3, 32, 32)),
    (cli_args.shape, "4x64", (4, 64)), (cli_args.json_object, '{"width": 8}', {"width": 8}),
    (cli_args.numbers(2, 0, 1, hi_open=True), "0.9,0.999", [0.9, 0.999]), (cli_args.threads, "1", 1),
])
def test_types_accept(parse, text: str, value) -> None:
    assert parse(text) == value


@pytest.mark.parametrize("parse,text,needle", [
    (cli_args.positive_int, "0", ">= 1"), (cli_args.positive_int, "2.5", "expected an integer"),
    (cli_args.non_negative_int, "-1", ">= 0"), (cli_args.fraction, "1", "> 0 and < 1"),
    (cli_args.fraction, "nan", "finite"), (cli_args.learning_rate, "inf", "finite number > 0"),
    (cli_args.learning_rate, "-0.1", "> 0"), (cli_args.number(0), "nan", "finite number >= 0"),
    (cli_args.shape, "", "comma-separated integers"), (cli_args.shape, "8,0,3", "positive dimensions"),
    (cli_args.shape, "100000,3,10000,10000", "at most 268,435,456"),
    (cli_args.json_object, "[1]", "a JSON object"), (cli_args.json_object, "{nope", "not JSON"),
    (cli_args.json_object, '{"a": NaN}', "not JSON"),
    (cli_args.numbers(2), "2,abc", "comma-separated numbers"), (cli_args.numbers(2), "0.9", "expected 2"),
    (cli_args.numbers(2, 0, 1, hi_open=True), "1.5,0.9", "each must be a finite number >= 0 and < 1"),
    (cli_args.threads, "100000", f"from 1 to {cli_args.max_threads()}"), (cli_args.threads, "0", "from 1"),
    (cli_args.seed, "-1", ">= 0"),
])
def test_types_refuse(parse, text: str, needle: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(needle)):
        parse(text)


def test_output_checks(tmp_path: Path) -> None:
    from pockprop.errors import UsageError

    (tmp_path / "file").write_text("x")
    (tmp_path / "art").mkdir()
    cli_args.check_output_file(str(tmp_path / "new.onnx"), "-o")
    cli_args.check_output_file(str(tmp_path / "file"), "-o")  # replacing a file is fine
    cli_args.check_output_dir(str(tmp_path / "a" / "b"), "-o")  # created on write
    for check, path, needle in [
        (cli_args.check_output_file, tmp_path, "is a folder"),
        (cli_args.check_output_file, tmp_path / "missing" / "x.onnx", "does not exist"),
        (cli_args.check_output_dir, tmp_path / "file", "exists and is not a folder"),
        (cli_args.check_output_dir, tmp_path / "file" / "sub", "is not a folder"),
    ]:
        with pytest.raises(UsageError, match=needle):
            check(str(path), "-o")
    for path in (tmp_path / "art", tmp_path / "art" / "infer.onnx", tmp_path / "art" / "sub" / ".." / "x"):
        with pytest.raises(UsageError, match="inside the artifact"):
            cli_args.check_not_inside(str(path), str(tmp_path / "art"), "-o")
    cli_args.check_not_inside(str(tmp_path / "art.onnx"), str(tmp_path / "art"), "-o")
