"""The project's own exceptions: every user-facing failure is one of these.

The CLI turns them into a one-line message and a non-zero exit code; library
code raises them and never prints or exits.
"""

from __future__ import annotations


class BgSwapError(Exception):
    """A failure the user can act on; the message names the problem and the fix."""

    exit_code = 1


class UsageError(BgSwapError, ValueError):
    """An option or argument has an invalid value."""

    exit_code = 2


class InputImageError(BgSwapError):
    """An input image cannot be read or processed."""


class ImageTooLargeError(InputImageError):
    """An input image has more pixels than the limit (the decompression-bomb guard); a server answers 413."""


class ModelError(BgSwapError):
    """A model folder, file or source is missing, corrupt or of the wrong kind."""


class BackendUnavailable(BgSwapError):
    """An optional backend (TensorRT, CUDA, the export stack) is not installed or not usable here."""


class OutputError(BgSwapError):
    """An output cannot be written: unwritable folder, or it would overwrite an input."""


class OutputExistsError(OutputError):
    """The output already exists and overwriting was not asked for; a batch skips the image."""
