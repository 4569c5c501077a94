"""The library's errors that a caller without the model reports: importable without
torch, so that a command line that only writes streams need not load it (1-2 s)."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt, tampered with or of an unknown format."""
