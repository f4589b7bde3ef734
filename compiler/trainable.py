"""Selecting trainable parameters by fully qualified name patterns (fnmatch, as the user writes them)."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Iterable

from pockprop.errors import CompileError


def split_patterns(patterns: str | Iterable[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    out = [p.strip() for p in patterns if p.strip()]
    if not out:
        raise CompileError("no trainable pattern given (use '*' to train every parameter)")
    return out


def select(patterns: list[str] | None, parameters: list[str], buffers: list[str]) -> list[str]:
    """Parameters matching any pattern, in model order; a pattern matching nothing is an error."""
    if patterns is None:
        return list(parameters)
    chosen: set[str] = set()
    for pat in patterns:
        hits = [p for p in parameters if fnmatch.fnmatchcase(p, pat)]
        if not hits:
            buf = [b for b in buffers if fnmatch.fnmatchcase(b, pat)]
            if buf:
                raise CompileError(f"trainable pattern {pat!r} matches only buffers ({buf[0]}, ...); "
                                   "BatchNorm statistics are frozen, not trainable")
            close = difflib.get_close_matches(pat.rstrip("*."), parameters, n=3, cutoff=0.5)
            hint = f"; similar names: {', '.join(close)}" if close else f"; parameters look like {parameters[0]!r}"
            raise CompileError(f"trainable pattern {pat!r} matches no parameter of the model{hint}")
        chosen.update(hits)
    return [p for p in parameters if p in chosen]
