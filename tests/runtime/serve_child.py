"""`pockprop serve` with tests.runtime.fake_part's numpy part in place of a compiled one (the artifact argument
is the fake's JSON file): the command line, startup line, signals and checkpoints as a user gets them."""
from __future__ import annotations

import sys

from pockprop import cli
from pockprop.runtime import serve
from tests.runtime.fake_part import FakePart

serve.load_part = lambda path, threads: FakePart.load(path, threads)  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
