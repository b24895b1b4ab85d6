"""ECDSA P-256 signing keys in cosign's file formats.

Public key: PEM ``PUBLIC KEY`` (PKIX / SubjectPublicKeyInfo DER), what ``cosign generate-key-pair``
writes to ``cosign.pub``.

Private key: PEM ``ENCRYPTED SIGSTORE PRIVATE KEY`` (cosign >= 2.x) or ``ENCRYPTED COSIGN PRIVATE KEY``
(older cosign; also the only label containers/image and podman 4.4 read). The PEM body is the JSON that
go-securesystemslib's ``encrypted.Encrypt`` writes (cosign ``pkg/cosign/keys.go``)::

    {"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"<b64 32 bytes>"},
     "cipher":{"name":"nacl/secretbox","nonce":"<b64 24 bytes>"},"ciphertext":"<b64 tag||ct>"}

with the scrypt-derived 32-byte key sealing the PKCS#8 DER of the private key. Writing uses N=32768
(cosign's "legacy" parameters, which every cosign version reads); reading also accepts the two
stronger parameter sets current go-securesystemslib accepts (N=65536 and N=131072, r=8, p=1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.secret
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from registry.errors import KeyFormatError, KeyPasswordError, UnsupportedKeyTypeError

SIGSTORE_PRIVATE_KEY_LABEL = "ENCRYPTED SIGSTORE PRIVATE KEY"
COSIGN_PRIVATE_KEY_LABEL = "ENCRYPTED COSIGN PRIVATE KEY"
ENCRYPTED_LABELS = (SIGSTORE_PRIVATE_KEY_LABEL, COSIGN_PRIVATE_KEY_LABEL)
PUBLIC_KEY_LABEL = "PUBLIC KEY"

SCRYPT_WRITE_PARAMS = (32768, 8, 1)
SCRYPT_READ_PARAMS = frozenset({(32768, 8, 1), (65536, 8, 1), (131072, 8, 1)})
SALT_SIZE = 32
NONCE_SIZE = 24
BOX_KEY_SIZE = 32

_PEM_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----",
    re.DOTALL,
)


@dataclass(frozen=True)
class KeyPair:
    """A freshly generated or imported key pair, as the bytes of ``cosign.key`` and ``cosign.pub``."""

    private_pem: bytes
    public_pem: bytes


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    blocks = []
    for m in _PEM_RE.finditer(data):
        label = m.group(1).decode("ascii")
        lines = [ln.strip() for ln in m.group(2).splitlines()]
        # Go's pem.Decode allows "Key: value" headers before a blank line; cosign writes none.
        body = b"".join(ln for ln in lines if ln and b":" not in ln)
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFormatError(f"PEM block {label!r} has a corrupt base64 body") from None
        blocks.append((label, der))
    return blocks


def _one_pem_block(data: bytes, source: str, labels: tuple[str, ...]) -> tuple[str, bytes]:
    try:
        blocks = _pem_blocks(data)
    except KeyFormatError as exc:
        raise KeyFormatError(f"{source}: {exc}; use the file cosign or `llmctl key generate` wrote") from None
    if not blocks:
        raise KeyFormatError(
            f"{source}: no PEM block found (expected {' or '.join(labels)}); is this a key file at all?"
        )
    label, der = blocks[0]
    if label not in labels:
        raise KeyFormatError(f"{source}: PEM label is {label!r}, expected {' or '.join(repr(x) for x in labels)}")
    return label, der


def _pem_encode(label: str, der: bytes) -> bytes:
    """PEM exactly as Go's ``pem.EncodeToMemory``: 64-column base64 lines and a trailing newline."""
    b64 = base64.b64encode(der)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return b"".join(
        [f"-----BEGIN {label}-----\n".encode(), *(ln + b"\n" for ln in lines), f"-----END {label}-----\n".encode()]
    )


def describe_key(key: object) -> str:
    """A short human name for a key's type: ``ECDSA P-256``, ``RSA 2048``, ``Ed25519``."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"ECDSA {names.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def _require_p256(key: object, source: str) -> None:
    ok = isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    if not ok:
        raise UnsupportedKeyTypeError(
            f"{source}: key type {describe_key(key)} is not supported; llmctl signs and verifies with "
            "ECDSA P-256 keys only (`llmctl key generate` or `cosign generate-key-pair` make one)"
        )


# --- public keys -------------------------------------------------------------------------------


def load_public_key(pem: bytes, source: str = "public key") -> ec.EllipticCurvePublicKey:
    """Read a PEM ``PUBLIC KEY`` (SPKI) holding an ECDSA P-256 key; `source` names the file in errors."""
    _, der = _one_pem_block(pem, source, (PUBLIC_KEY_LABEL,))
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError(
            f"{source}: the PUBLIC KEY block is not a valid SubjectPublicKeyInfo (corrupt or altered key file)"
        ) from None
    _require_p256(key, source)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def public_key_pem(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> bytes:
    """The PEM ``PUBLIC KEY`` bytes cosign writes for this key (``cosign.pub``)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _pem_encode(PUBLIC_KEY_LABEL, der)


def fingerprint(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """``sha256:<hex>`` of the public key's SPKI DER: a stable name for a key in messages and policies."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


# --- encrypted private keys --------------------------------------------------------------------


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + (1 << 20), dklen=BOX_KEY_SIZE)


def encrypt_private_key(
    key: ec.EllipticCurvePrivateKey, password: bytes, label: str = SIGSTORE_PRIVATE_KEY_LABEL
) -> bytes:
    """The encrypted PEM cosign writes for `key` (PKCS#8 DER sealed with scrypt + nacl/secretbox)."""
    if label not in ENCRYPTED_LABELS:
        raise ValueError(f"label must be one of {ENCRYPTED_LABELS}")
    _require_p256(key, "private key")
    pkcs8 = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    n, r, p = SCRYPT_WRITE_PARAMS
    salt = os.urandom(SALT_SIZE)
    nonce = os.urandom(NONCE_SIZE)
    box_key = _scrypt(password, salt, n, r, p)
    sealed = nacl.secret.SecretBox(box_key).encrypt(pkcs8, nonce).ciphertext  # tag || ciphertext, as Go's Seal
    # Field order and compact layout of Go's json.Marshal of go-securesystemslib's `data` struct.
    body = {
        "kdf": {"name": "scrypt", "params": {"N": n, "r": r, "p": p}, "salt": base64.b64encode(salt).decode()},
        "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(nonce).decode()},
        "ciphertext": base64.b64encode(sealed).decode(),
    }
    return _pem_encode(label, json.dumps(body, separators=(",", ":")).encode())


def _b64_field(obj: dict[str, Any], name: str, source: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str):
        raise KeyFormatError(f"{source}: field {name!r} is missing or not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{source}: field {name!r} is not valid base64") from None


def decrypt_private_key_der(pem: bytes, password: bytes, source: str = "private key") -> bytes:
    """Decrypt a cosign encrypted private key PEM to its PKCS#8 DER bytes (no key-type check)."""
    _, body = _one_pem_block(pem, source, ENCRYPTED_LABELS)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise KeyFormatError(f"{source}: the encrypted key body is not the JSON cosign writes (corrupt file)") from None
    if not isinstance(data, dict):
        raise KeyFormatError(f"{source}: the encrypted key body is not a JSON object")
    kdf, cipher = data.get("kdf"), data.get("cipher")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        raise KeyFormatError(f"{source}: field 'kdf.name' must be 'scrypt'")
    if not isinstance(cipher, dict) or cipher.get("name") != "nacl/secretbox":
        raise KeyFormatError(f"{source}: field 'cipher.name' must be 'nacl/secretbox'")
    params = kdf.get("params")
    triple = (params.get("N"), params.get("r"), params.get("p")) if isinstance(params, dict) else None
    if triple not in SCRYPT_READ_PARAMS:
        # Checked before deriving: attacker-chosen parameters could otherwise exhaust memory or CPU.
        raise KeyFormatError(
            f"{source}: unsupported scrypt parameters {params!r} in field 'kdf.params' (cosign uses N=32768, r=8, p=1)"
        )
    assert triple is not None
    salt = _b64_field(kdf, "salt", source)
    nonce = _b64_field(cipher, "nonce", source)
    sealed = _b64_field(data, "ciphertext", source)
    if len(nonce) != NONCE_SIZE:
        raise KeyFormatError(f"{source}: field 'cipher.nonce' must be {NONCE_SIZE} bytes, got {len(nonce)}")
    box_key = _scrypt(password, salt, *triple)
    try:
        return nacl.secret.SecretBox(box_key).decrypt(sealed, nonce)
    except nacl.exceptions.CryptoError:
        raise KeyPasswordError(
            f"{source}: wrong password (or the key file was altered); check the password set when the key was generated"
        ) from None


def _is_pkcs8(der: bytes) -> bool:
    """True when `der` is SEQUENCE { INTEGER, SEQUENCE (AlgorithmIdentifier), ... } (PKCS#8), not
    SEC1's SEQUENCE { INTEGER, OCTET STRING, ... }: cosign (Go's ParsePKCS8PrivateKey) reads only PKCS#8."""
    if len(der) < 4 or der[0] != 0x30:
        return False
    i = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)  # skip the outer length
    if i + 2 > len(der) or der[i] != 0x02:
        return False
    i += 2 + der[i + 1]  # skip the version INTEGER (short form: a few bytes)
    return i < len(der) and der[i] == 0x30


def load_private_key(pem: bytes, password: bytes, source: str = "private key") -> ec.EllipticCurvePrivateKey:
    """Decrypt a cosign encrypted private key and return it; it must be ECDSA P-256 in PKCS#8."""
    der = decrypt_private_key_der(pem, password, source)
    if not _is_pkcs8(der):
        raise KeyFormatError(
            f"{source}: the decrypted key is not PKCS#8 DER (cosign writes and reads only PKCS#8); "
            "re-import it with `llmctl key import`"
        )
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFormatError(f"{source}: the decrypted key is not PKCS#8 DER (cosign writes PKCS#8)") from None
    _require_p256(key, source)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def generate_key_pair(password: bytes, label: str = SIGSTORE_PRIVATE_KEY_LABEL) -> KeyPair:
    """A new ECDSA P-256 key pair in cosign's formats, the private key encrypted under `password`."""
    key = ec.generate_private_key(ec.SECP256R1())
    return KeyPair(private_pem=encrypt_private_key(key, password, label), public_pem=public_key_pem(key))


def import_key_pair(
    pem: bytes, password: bytes, source: str = "private key", label: str = SIGSTORE_PRIVATE_KEY_LABEL
) -> KeyPair:
    """Re-encrypt an unencrypted PEM private key (``EC PRIVATE KEY`` or PKCS#8 ``PRIVATE KEY``), like
    ``cosign import-key-pair``; only ECDSA P-256 is accepted."""
    found, _ = _one_pem_block(pem, source, ("EC PRIVATE KEY", "PRIVATE KEY", "RSA PRIVATE KEY"))
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFormatError(
            f"{source}: the {found} block could not be parsed (corrupt, or itself encrypted)"
        ) from None
    _require_p256(key, source)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return KeyPair(private_pem=encrypt_private_key(key, password, label), public_pem=public_key_pem(key))
