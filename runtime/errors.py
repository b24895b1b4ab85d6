"""The runtime's user-facing errors: each message says what is wrong, where, and what to do.

The runtime is installed into model images on its own, so it has its own small hierarchy; the
llmctl CLI maps `ModelError` to a one-line message and a non-zero exit code.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error the runtime reports to a user."""


class GGUFError(ModelError):
    """A GGUF file is truncated, corrupted or malformed."""


class UnsupportedModelError(ModelError):
    """A well-formed file uses an architecture, tensor type or feature the runtime does not run."""


class TokenizerError(ModelError):
    """The file's vocabulary cannot be turned into a tokenizer."""


class ContextOverflowError(ModelError):
    """A prompt plus the requested tokens do not fit in the context window."""


class GenerationError(ModelError):
    """Bad generation parameters (temperature, top-p, ...)."""
