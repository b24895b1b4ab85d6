"""Errors of `registry.oci`, under the registry package's `RegistryError`."""

from __future__ import annotations

from registry.errors import RegistryError


class OCIError(RegistryError):
    """Base of every error reading or writing OCI images."""


class LayerEntryError(OCIError):
    """A layer entry is invalid: an absolute escape (`..`), a duplicate path, or no content."""


class BlobVerificationError(OCIError):
    """A blob's bytes do not match the digest (or size) that names it: nothing read from it is trusted."""


class LayoutError(OCIError):
    """An OCI image layout directory is malformed, or the reference asked for is not in it."""


class DaemonError(OCIError):
    """The Docker engine refused an image, or loaded it under a different ID than its config digest."""
