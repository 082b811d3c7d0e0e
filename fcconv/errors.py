"""The user-error hierarchy.

Everything raised from here is the user's to fix: the CLI prints it as one
line and exits 2. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class FcconvError(Exception):
    """A problem with the user's input that the user can fix; exit code 2."""

    exit_code = 2


class SpecError(FcconvError):
    """A malformed or inconsistent patch, stride, order or input size."""


class LayerError(FcconvError):
    """An unknown, ambiguous or unsuitable layer name."""


class CheckpointError(FcconvError):
    """A checkpoint that cannot be read or written safely."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need arbitrary unpickling to load."""
