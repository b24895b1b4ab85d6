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
