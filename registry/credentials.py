"""Registry credentials: llmctl's own auth file, with Docker's ``config.json`` as a fallback.

llmctl's file has Docker's shape, ``{"auths": {"registry.internal:5000": {"auth": base64("user:pass")}}}``,
so it can be read by other tools; it is written atomically with mode 0600 and refused when group or
others can read it (like ssh refuses an open private key). `CredentialStore.get` looks there first,
then in ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``): ``credHelpers`` for that
registry, then ``auths`` (``auth`` or ``username``/``password``), with ``credsStore`` consulted for
registries Docker logged in to. A credential helper is run as ``docker-credential-<name> get``
(registry on stdin, JSON on stdout); a helper that is not installed is an error naming it.

Passwords are never logged and never part of a message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import CredentialsError

HELPER_TIMEOUT = 30


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or token) for one registry; `repr` hides the password."""

    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def registry_key(registry: str) -> str:
    """``https://registry.internal:5000/v2/`` -> ``registry.internal:5000``: how auth entries are matched."""
    key = registry.strip()
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    return key.split("/", 1)[0].lower()


def _decode_auth(value: str, where: str) -> Credentials:
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise CredentialsError(f"{where}: 'auth' is not base64 of user:password") from None
    if not sep or not user:
        raise CredentialsError(f"{where}: 'auth' is not base64 of user:password")
    return Credentials(user, password)


def _entry_credentials(entry: Any, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise CredentialsError(f"{where}: the entry is not a JSON object")
    if entry.get("auth"):
        return _decode_auth(str(entry["auth"]), where)
    if entry.get("username") and entry.get("password") is not None:
        return Credentials(str(entry["username"]), str(entry["password"]))
    if entry.get("identitytoken"):
        raise CredentialsError(f"{where}: identity tokens (OAuth refresh tokens) are not supported; use a password")
    return None


def _find_entry(auths: Any, registry: str) -> tuple[str, Any] | None:
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if registry_key(str(key)) == registry:
            return str(key), entry
    return None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except OSError as e:
        raise CredentialsError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise CredentialsError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CredentialsError(f"{path} is not a JSON object")
    return doc


def run_helper(helper: str, registry: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` for `registry`'s credentials (None when it has none)."""
    program = f"docker-credential-{helper}"
    path = shutil.which(program)
    if path is None:
        raise CredentialsError(
            f"Docker's config uses the credential helper {helper!r} for {registry}, but {program} is not on PATH; "
            f"install it, or run `llmctl registry login {registry}`"
        )
    try:
        done = subprocess.run(
            [path, "get"], input=registry.encode(), capture_output=True, timeout=HELPER_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CredentialsError(f"credential helper {program} failed for {registry}: {e}") from None
    out = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0:
        if "credentials not found" in out.lower():
            return None
        raise CredentialsError(
            f"credential helper {program} failed for {registry} (exit {done.returncode}): {out.splitlines()[:1]}"
        )
    try:
        doc = json.loads(out)
        username, secret = str(doc["Username"]), str(doc["Secret"])
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"credential helper {program} returned something other than its JSON") from None
    if username == "<token>":
        raise CredentialsError(f"{program} holds an identity token for {registry}; identity tokens are not supported")
    return Credentials(username, secret)


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, default ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def docker_credentials(registry: str, config: Path | None = None) -> Credentials | None:
    """`registry`'s credentials from Docker's config.json (and its credential helpers), or None."""
    path = config or docker_config_path()
    if not path.is_file():
        return None
    doc = _load_json(path)
    key = registry_key(registry)
    helpers = doc.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for host, helper in helpers.items():
            if registry_key(str(host)) == key and helper:
                return run_helper(str(helper), key)
    found = _find_entry(doc.get("auths"), key)
    if found is not None:
        where = f"{path}: auths[{found[0]!r}]"
        creds = _entry_credentials(found[1], where)
        if creds is not None:
            return creds
        if doc.get("credsStore"):  # `docker login` with a store leaves an empty entry here
            return run_helper(str(doc["credsStore"]), key)
    return None


class CredentialStore:
    """llmctl's credentials file (``registry/auth.json`` under the config dir: the caller picks the path)."""

    def __init__(self, path: Path, *, docker_config: Path | None = None, use_docker_config: bool = True) -> None:
        self.path = path
        self.docker_config = docker_config
        self.use_docker_config = use_docker_config

    def __repr__(self) -> str:
        return f"CredentialStore({str(self.path)!r})"

    def _read(self) -> dict[str, Any]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {"auths": {}}
        except OSError as e:
            raise CredentialsError(f"cannot read {self.path}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CredentialsError(
                f"{self.path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"it holds passwords: run `chmod 600 {self.path}`"
            )
        doc = _load_json(self.path)
        if not isinstance(doc.setdefault("auths", {}), dict):
            raise CredentialsError(f"{self.path}: 'auths' is not a JSON object")
        return doc

    def _write(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".auth-", dir=self.path.parent)  # mkstemp creates it 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def login(self, registry: str, username: str, password: str) -> None:
        """Store `registry`'s credentials (replacing older ones). Does not contact the registry."""
        if not username or ":" in username:
            raise CredentialsError("the user name must be non-empty and must not contain ':'")
        doc = self._read()
        key = registry_key(registry)
        doc["auths"] = {k: v for k, v in doc["auths"].items() if registry_key(k) != key}
        doc["auths"][key] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
        self._write(doc)

    def logout(self, registry: str) -> bool:
        """Forget `registry`'s credentials; False when there were none (Docker's config is not touched)."""
        doc = self._read()
        key = registry_key(registry)
        kept = {k: v for k, v in doc["auths"].items() if registry_key(k) != key}
        if len(kept) == len(doc["auths"]):
            return False
        doc["auths"] = kept
        self._write(doc)
        return True

    def registries(self) -> list[str]:
        """The registries llmctl's own file has credentials for."""
        return sorted(registry_key(k) for k in self._read()["auths"])

    def get(self, registry: str) -> Credentials | None:
        """`registry`'s credentials: llmctl's file first, then Docker's config (None: go anonymous)."""
        key = registry_key(registry)
        found = _find_entry(self._read()["auths"], key)
        if found is not None:
            creds = _entry_credentials(found[1], f"{self.path}: auths[{found[0]!r}]")
            if creds is not None:
                return creds
        if self.use_docker_config:
            return docker_credentials(key, self.docker_config)
        return None
