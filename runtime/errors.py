"""The runtime's error types; the CLI maps all three to exit code 2 (bad input), anything else to 1."""
from __future__ import annotations


class ArtifactError(Exception):
    """The artifact cannot be used: missing, truncated, tampered, contradictory or of an unknown version."""


class CheckpointError(ArtifactError):
    """A checkpoint cannot be written or read, or belongs to another artifact."""


class DataError(ValueError):
    """Training or inference data does not fit the model: wrong shape, dtype, labels or file format."""
