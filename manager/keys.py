"""`llmctl key generate | import | export | ls`: signing keys in cosign's formats.

Keys live in `<config>/keys/NAME.key` (encrypted private key, mode 0600) and `NAME.pub`. The
password comes from LLMCTL_KEY_PASSWORD (or cosign's COSIGN_PASSWORD), else from a prompt on a
terminal; it is never printed or logged.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from manager.errors import LlmctlError
from manager.paths import config_dir
from registry import keys as cosign_keys

PASSWORD_ENV = ("LLMCTL_KEY_PASSWORD", "COSIGN_PASSWORD")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyStoreError(LlmctlError):
    """A key name, file or password problem."""


@dataclass(frozen=True)
class KeyInfo:
    name: str
    fingerprint: str
    private_key: Path | None
    public_key: Path


def keys_dir() -> Path:
    return config_dir() / "keys"


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise KeyStoreError(f"key name {name!r} is not valid: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def password(*, confirm: bool) -> bytes:
    """The key password from the environment, or asked for on the terminal."""
    for var in PASSWORD_ENV:
        value = os.environ.get(var)
        if value is not None:
            return value.encode()
    if not sys.stdin.isatty():
        raise KeyStoreError(f"no password: set {PASSWORD_ENV[0]} (or run on a terminal to be asked)")
    first = getpass.getpass("key password: ")
    if confirm and getpass.getpass("again: ") != first:
        raise KeyStoreError("the two passwords differ; nothing was written")
    return first.encode()


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with `mode` from the start (a private key is never world-readable, even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _store(name: str, pair: cosign_keys.KeyPair, force: bool, directory: Path | None) -> KeyInfo:
    d = directory or keys_dir()
    d.mkdir(parents=True, exist_ok=True)
    priv, pub = d / f"{name}.key", d / f"{name}.pub"
    if not force and (priv.exists() or pub.exists()):
        raise KeyStoreError(f"{priv} already exists; choose another --name or pass --force to replace it")
    _write(priv, pair.private_pem, 0o600)
    _write(pub, pair.public_pem, 0o644)
    key = cosign_keys.load_public_key(pair.public_pem, str(pub))
    return KeyInfo(name, cosign_keys.fingerprint(key), priv, pub)


def generate(name: str = "cosign", *, force: bool = False, directory: Path | None = None) -> KeyInfo:
    """A new ECDSA P-256 key pair, the private key encrypted as `cosign generate-key-pair` does."""
    _check_name(name)
    pair = cosign_keys.generate_key_pair(password(confirm=True))
    return _store(name, pair, force, directory)


def import_pem(pem_file: Path, name: str = "cosign", *, force: bool = False, directory: Path | None = None) -> KeyInfo:
    """Re-encrypt an unencrypted P-256 PEM private key in cosign's format (`cosign import-key-pair`)."""
    _check_name(name)
    try:
        pem = pem_file.read_bytes()
    except OSError as e:
        raise KeyStoreError(f"{pem_file}: cannot read: {e.strerror or e}") from None
    pair = cosign_keys.import_key_pair(pem, password(confirm=True), source=str(pem_file))
    return _store(name, pair, force, directory)


def export(name: str = "cosign", *, private: bool = False, directory: Path | None = None) -> bytes:
    """The public key PEM (for verifiers), or the still-encrypted private key file."""
    _check_name(name)
    path = (directory or keys_dir()) / f"{name}.{'key' if private else 'pub'}"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyStoreError(f"no key named {name!r} ({path}); create one with `llmctl key generate`") from None


def list_keys(directory: Path | None = None) -> list[KeyInfo]:
    d = directory or keys_dir()
    out = []
    for pub in sorted(d.glob("*.pub")) if d.is_dir() else []:
        key = cosign_keys.load_public_key(pub.read_bytes(), str(pub))
        priv = pub.with_suffix(".key")
        out.append(KeyInfo(pub.stem, cosign_keys.fingerprint(key), priv if priv.exists() else None, pub))
    return out
