"""llmctl's user-facing errors: each message says what is wrong, where, and what to do.

The CLI prints any `LlmctlError` on one line (``llmctl: error: <message>``) and exits with 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations


class LlmctlError(Exception):
    """Base of every error llmctl reports to a user."""


class DigestFormatError(LlmctlError):
    """A digest is not ``sha256:`` followed by 64 lower-case hex digits."""


class FetchError(LlmctlError):
    """A file could not be downloaded or copied (network, HTTP status, missing file)."""


class DigestMismatchError(FetchError):
    """Fetched bytes do not hash to the expected digest."""


class CacheError(LlmctlError):
    """The blob store is unusable or a requested blob is missing or corrupt."""


class ImageBuildError(LlmctlError):
    """A model image cannot be built from these inputs (nothing is built)."""
