"""Errors of the `registry` package: keys, signatures and attestations.

`registry` must not import `manager`, so this is its own small hierarchy under `RegistryError`.
Each message is one line for a user: what is wrong, where (file, field, key fingerprint), what to do.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error the registry package reports to a user."""


class KeyFormatError(RegistryError):
    """A key file is not in a format llmctl reads (bad PEM, wrong label, corrupt JSON/DER, bad KDF fields)."""


class UnsupportedKeyTypeError(KeyFormatError):
    """A key is well formed but is not ECDSA P-256 (for example RSA, Ed25519 or ECDSA P-384)."""


class KeyPasswordError(RegistryError):
    """An encrypted private key could not be decrypted: the password is wrong (or the file was altered)."""


class SignatureError(RegistryError):
    """Base of every verification failure: nothing signed may be trusted after one of these."""


class SignatureMismatchError(SignatureError):
    """The signature does not verify over these payload bytes with this public key."""


class UntrustedKeyError(SignatureError):
    """A signature verifies with none of the trusted public keys."""


class PayloadError(SignatureError):
    """A signed payload is malformed or is not the kind of payload expected (type, media type, fields)."""


class SignedDigestMismatchError(SignatureError):
    """A valid signature names a different manifest (or subject) digest than the one being verified."""


class AttestationError(SignatureError):
    """A DSSE envelope or in-toto statement is malformed or does not match what was expected."""


class MissingSignatureError(SignatureError):
    """An image has no signature (or no attestation of a required kind) where one is required."""


# -- references, credentials and the distribution client (registry/reference.py, credentials.py,
#    distribution.py, copy.py). Messages name the registry URL, never a password or token.


class InvalidReferenceError(RegistryError):
    """An image reference (``host[:port]/repo[:tag][@digest]`` or ``oci-layout:PATH[:REF]``) does not parse."""


class CredentialsError(RegistryError):
    """The credentials file is unreadable or too open, or a Docker credential helper failed or is missing."""


class RegistryTLSError(RegistryError):
    """TLS to a registry failed: unknown CA, wrong host name, or plain HTTP where TLS was expected."""


class RegistryUnavailableError(RegistryError):
    """The registry cannot be reached (connection refused, DNS, timeout) or answered 502/503/504."""


class RegistryHTTPError(RegistryError):
    """The registry answered with an error status; `status` and `code` (from its JSON error body) say which."""

    def __init__(self, message: str, *, url: str = "", status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.code = code


class RegistryAuthError(RegistryHTTPError):
    """The registry (or its token server) refused the credentials, or gave none of the access asked for."""


class ManifestUnknownError(RegistryHTTPError):
    """The registry has no manifest (or no repository) of that tag or digest."""


class BlobUnknownError(RegistryHTTPError):
    """The registry has no blob of that digest in that repository."""


class ManifestFormatError(RegistryError):
    """A manifest is not JSON, too big, or of a media type llmctl does not copy (for example Docker schema 1)."""


class UploadInterruptedError(RegistryError):
    """A chunked blob upload stopped part way; `location` and `offset` say where ``resume_upload`` continues."""

    def __init__(self, message: str, *, location: str, offset: int) -> None:
        super().__init__(message)
        self.location = location
        self.offset = offset
