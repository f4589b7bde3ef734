"""The runtime tests' compiled tiny artifacts, for the loader's tests here."""
from tests.runtime.conftest import artifact, compiled  # noqa: F401
