"""The examples of README.md and docs/*.md run, and what the docs name exists: a broken example fails CI.

The convention, for whoever writes a doc:
- Every fenced block names its language. `python`, `console` and `sh` blocks run; `text` (output, diagrams,
  synopses), `yaml`, `json` and `toml` blocks do not. A bare fence is an error, so no command hides in one.
- A file's blocks run in document order in one fresh working directory, and its `python` blocks share one
  namespace: a block may use what an earlier block of the same file made. Files share nothing.
- `console`: each line starting with `$ ` is a command; the other lines are its output, for the reader (not
  compared). `sh`: every line is a command (blank and `#` lines skipped). A line ending in `\\` continues.
  Commands run in bash and must exit 0; `pockprop` and `python` on their PATH are this checkout's
  (`python -m pockprop` with the repository root importable, as an installed wheel would be).
- HTML comments on the lines right above a block (stacked, one directive each) change how it runs:
    <!-- docs-test: skip (REASON) -->          not run; the reason is mandatory and reported as a pytest skip
    <!-- docs-test: replace "OLD" "NEW" -->     run with OLD replaced by NEW, e.g. tiny shapes (more pairs may
                                                follow); every OLD must occur, so a stale replace fails
    <!-- docs-test: env NAME=VALUE -->          extra environment variables for the block
    <!-- docs-test: write PATH -->              not run: its text is written to PATH for later blocks
  Skip only what cannot run here (make targets that build their own venv, board-only commands, runs of
  minutes); make an example small rather than skip it. Data comes from an installed package (scikit-learn's
  digits) or an earlier block, never from the network.
- Relative links resolve, every path of the repository a doc names exists, and every `pockprop.x.y` named in
  backticks resolves; a stage folder's module is named with its package (`pockprop.runtime.data`).
"""
from __future__ import annotations

import builtins
import importlib
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "console", "sh"}
SHOWN = {"text", "yaml", "json", "toml"}
TIMEOUT = 300  # seconds per command: a hung example fails instead of stalling the suite
# Folders that no longer exist (the stages were `engine/`'s modules): a doc that names one is stale.
GONE = {"engine"}
EXTENSIONS = {"py", "md", "png", "json", "yaml", "onnx", "npz", "csv", "safetensors", "pockprop", "txt", "sh"}

FENCE = re.compile(r"^(`{3,}|~{3,})\s*(\S*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->$")


class DocError(Exception):
    """A doc that breaks the convention (says where)."""


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None = None
    replace: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    write: str | None = None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT).as_posix()}:{self.line}"

    def source(self) -> str:
        text = self.text
        for old, new in self.replace:
            if old not in text:
                raise DocError(f"{self.where}: replace {old!r}: not in the block")
            text = text.replace(old, new)
        return text


def _directive(block: Block, name: str, arg: str, where: str) -> None:
    if name == "skip":
        m = re.fullmatch(r"\((.*\S.*)\)", arg)
        if not m:
            raise DocError(f"{where}: skip needs a reason in parentheses: <!-- docs-test: skip (why) -->")
        block.skip = m.group(1)
    elif name == "replace":
        words = shlex.split(arg)
        if not words or len(words) % 2:
            raise DocError(f"{where}: replace takes pairs \"OLD\" \"NEW\"")
        block.replace += list(zip(words[::2], words[1::2]))
    elif name == "env":
        for word in shlex.split(arg):
            key, eq, value = word.partition("=")
            if not eq or not key:
                raise DocError(f"{where}: env takes NAME=VALUE, not {word!r}")
            block.env[key] = value
    elif name == "write":
        if not arg or len(shlex.split(arg)) != 1:
            raise DocError(f"{where}: write takes one path")
        block.write = shlex.split(arg)[0]
    else:
        raise DocError(f"{where}: unknown docs-test directive {name!r} (skip, replace, env, write)")


def parse(doc: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of `doc` (or of `text`, named `doc`) with their directives; DocError where the
    convention is broken."""
    lines = (doc.read_text() if text is None else text).splitlines()
    rel = doc.relative_to(ROOT).as_posix()
    blocks: list[Block] = []
    pending: list[tuple[str, str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        d = DIRECTIVE.match(line)
        fence = FENCE.match(line)
        if d:
            pending.append((d.group(1), d.group(2), f"{rel}:{i + 1}"))
        elif fence:
            mark, lang = fence.groups()
            if lang not in RUN | SHOWN:
                raise DocError(f"{rel}:{i + 1}: a fenced block must name its language, one of "
                               f"{sorted(RUN | SHOWN)} (text if it is not code), not {lang or 'nothing'!r}")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(mark[0] * len(mark))
                        and not lines[j].strip().strip(mark[0])), None)
            if end is None:
                raise DocError(f"{rel}:{i + 1}: the block is never closed")
            block = Block(doc, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n")
            for name, arg, where in pending:
                _directive(block, name, arg, where)
            blocks.append(block)
            pending, i = [], end
        elif pending:
            raise DocError(f"{pending[0][2]}: a docs-test comment must be right above a fenced block")
        elif "docs-test" in line:
            raise DocError(f"{rel}:{i + 1}: malformed docs-test comment: <!-- docs-test: DIRECTIVE ARGS -->")
        i += 1
    if pending:
        raise DocError(f"{pending[0][2]}: a docs-test comment must be right above a fenced block")
    return blocks


def commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) of a console or sh block, continuation lines joined."""
    out: list[tuple[int, str]] = []
    current: str | None = None
    start = 0
    for k, line in enumerate(block.source().splitlines()):
        if current is not None:
            current += "\n" + line
        elif block.lang == "console":
            if not line.startswith("$ "):
                continue
            current, start = line[2:], k
        else:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            current, start = line, k
        if not current.rstrip().endswith("\\"):
            out.append((block.line + 1 + start, current))
            current = None
    if current is not None:
        raise DocError(f"{block.where}: the last command ends with a continuation")
    return out


def _parsed() -> dict[Path, list[Block] | DocError]:
    out: dict[Path, list[Block] | DocError] = {}
    for doc in DOCS:
        try:
            out[doc] = parse(doc)
        except DocError as ex:
            out[doc] = ex
    return out


PARSED = _parsed()
SKIPPED = [b for blocks in PARSED.values() if isinstance(blocks, list) for b in blocks if b.skip]


def _doc_id(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def _shell_env(tmp: Path) -> dict[str, str]:
    """The environment of a doc's commands: this checkout's `pockprop` and `python` first on the PATH."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, argv in (("pockprop", f'"{sys.executable}" -m pockprop'), ("python", f'"{sys.executable}"')):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k != "POCKPROP_VERIFY"}  # the docs run as a user runs them
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["MPLBACKEND"] = "Agg"
    return env


def _run_shell(block: Block, work: Path, env: dict[str, str]) -> None:
    for line, command in commands(block):
        try:
            out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=work, env={**env, **block.env},
                                 capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{_doc_id(block.doc)}:{line}: `{command}` ran over {TIMEOUT} s")
        if out.returncode != 0:
            pytest.fail(f"{_doc_id(block.doc)}:{line}: `{command}` exited {out.returncode}\n"
                        f"--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}", pytrace=False)


def _run_python(block: Block, namespace: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        for key, value in block.env.items():
            m.setenv(key, value)
        # blank lines first, so a traceback names the doc's own line numbers
        code = builtins.compile("\n" * block.line + block.source(), str(block.doc), "exec")
        exec(code, namespace)  # noqa: S102 - the doc's own example


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_examples_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = PARSED[doc]
    if isinstance(blocks, DocError):
        pytest.fail(str(blocks), pytrace=False)
    work = tmp_path / "work"
    work.mkdir()
    env = _shell_env(tmp_path)
    monkeypatch.chdir(work)
    monkeypatch.delenv("POCKPROP_VERIFY", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        t0 = time.perf_counter()
        if block.skip:
            print(f"{block.where}: skipped ({block.skip})")
        elif block.write:
            (work / block.write).parent.mkdir(parents=True, exist_ok=True)
            (work / block.write).write_text(block.source())
        elif block.lang == "python":
            _run_python(block, namespace, monkeypatch)
        elif block.lang in ("console", "sh"):
            _run_shell(block, work, env)
        elif block.replace or block.env:
            pytest.fail(f"{block.where}: replace/env on a {block.lang} block that does not run", pytrace=False)
        if not block.skip:
            print(f"{block.where}: {block.lang} {time.perf_counter() - t0:.1f} s")  # shown by pytest -s


@pytest.mark.parametrize("block", SKIPPED, ids=lambda b: b.where)
def test_skipped_block(block: Block) -> None:
    """One skip per block a doc marks `skip`, with its reason: `pytest -rs tests/test_docs.py` lists them."""
    if block.lang not in RUN:
        pytest.fail(f"{block.where}: skip on a {block.lang} block, which never runs", pytrace=False)
    pytest.skip(f"{block.where}: {block.skip}")


def _names(text: str) -> tuple[set[str], set[str], set[str]]:
    """(link targets, repository paths, backticked dotted names) that `text` mentions."""
    links = set(re.findall(r"\]\(([^)\s]+)\)", text))
    # the repository's own folders and files (not what examples make, like out/): a mention must exist
    tops = {p.name for p in ROOT.iterdir() if p.is_file() or any(p.glob("*.py")) or any(p.glob("*.md"))}
    tops = sorted({t for t in tops if not t.startswith(".")} | GONE, key=len, reverse=True)
    paths = {m.rstrip(".,:;") for m in re.findall(rf"(?<![\w./:~-])(?:{'|'.join(map(re.escape, tops))})/[\w./*-]*",
                                                  text)}
    dotted = set(re.findall(r"`([A-Za-z_]\w*(?:\.\w+)+)[`(\[]", text))
    return links, paths, dotted


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[k:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_named_files_and_modules_exist(doc: Path) -> None:
    links, paths, dotted = _names(doc.read_text())
    stages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} - {"pockprop", "tests"}
    problems = []
    for link in links:
        target = link.split("#")[0]
        if target and not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
            problems.append(f"link {link}: no such file")
    for path in paths:
        if not (list(ROOT.glob(path.rstrip("/"))) if "*" in path else (ROOT / path).exists()):
            problems.append(f"{path}: no such file or folder")
    for name in dotted:
        head, last = name.split(".")[0], name.rsplit(".", 1)[1]
        if last in EXTENSIONS:
            continue  # a file name
        if head in GONE:
            problems.append(f"`{name}`: there is no {head} package any more")
        elif head in stages:
            problems.append(f"`{name}`: name it `pockprop.{name}` (the stage folders are pockprop's subpackages)")
        elif head == "pockprop" and not _resolves(name):
            problems.append(f"`{name}`: does not resolve")
    assert not problems, f"{_doc_id(doc)}:\n  " + "\n  ".join(sorted(problems))


PROBE = ROOT / "docs" / "probe.md"  # a name for parse(); never written


def test_convention_catches_mistakes() -> None:
    """The parser refuses what would let an example go untested."""
    cases = {
        "```\npockprop train x\n```\n": "must name its language",
        "```bash\nls\n```\n": "must name its language",
        "<!-- docs-test: skip -->\n```sh\nls\n```\n": "needs a reason",
        "<!-- docs-test: skip (why) -->\n\ntext\n```sh\nls\n```\n": "right above",
        "<!-- docs-test: tiny -->\n```sh\nls\n```\n": "unknown docs-test directive",
        "```sh\nls\n": "never closed",
    }
    for text, message in cases.items():
        with pytest.raises(DocError, match=message):
            parse(PROBE, text)
    [block] = parse(PROBE, '<!-- docs-test: replace "8,3" "2,3" -->\n```console\n$ a 8,3 \\\n  b\nout\n$ c\n```\n')
    assert commands(block) == [(3, "a 2,3 \\\n  b"), (6, "c")]
    [stale] = parse(PROBE, '<!-- docs-test: replace "9,9" "1,1" -->\n```sh\na 8,3\n```\n')
    with pytest.raises(DocError, match="not in the block"):
        commands(stale)
