"""Checking the weights file against its pinned sha256 before anything is served.

Hashing a multi-gigabyte file on every start is slow, so a successful check leaves a record bound
to the file's identity (device, inode, size, modification and change times): the next start with
the same file and the same expected digest skips the hash. Any change to the file changes its
identity (a rewrite bumps ctime even when mtime is forged), so a record never vouches for other
bytes. `rehash=True` ignores records. A mismatch raises WeightsDigestError: nothing runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from runtime.errors import ModelError

DIGEST_RE = re.compile(r"^(sha256:)?([0-9a-f]{64})$")
CHUNK = 8 << 20


class WeightsDigestError(ModelError):
    """The weights file is not the one the image or chart pins."""


def parse_digest(text: str) -> str:
    """'sha256:<hex>' or '<hex>' -> '<hex>' (lower case); ModelError if malformed."""
    m = DIGEST_RE.match(text.strip().lower())
    if m is None:
        raise ModelError(f"{text!r} is not a sha256 digest (expected sha256: and 64 hex digits)")
    return m.group(2)


def default_record_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(os.environ.get("LLMCTL_VERIFY_DIR", str(Path(state) / "llmctl" / "verified")))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)  # hashlib releases the GIL on large buffers
    return h.hexdigest()


def _identity(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _record_path(record_dir: Path, path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return record_dir / f"{key}.json"


def verify_weights(
    path: str | os.PathLike[str], expected: str, *, rehash: bool = False, record_dir: Path | None = None
) -> bool:
    """Check `path` against the sha256 `expected`. Returns True when a record made the hash
    unnecessary, False when the file was hashed. Raises WeightsDigestError on a mismatch."""
    path = Path(path)
    want = parse_digest(expected)
    try:
        ident = _identity(path)
    except OSError as e:
        raise ModelError(f"{path}: cannot read the weights file: {e.strerror or e}") from None
    records = record_dir if record_dir is not None else default_record_dir()
    record = _record_path(records, path)
    if not rehash:
        try:
            saved = json.loads(record.read_text())
            if saved == {"sha256": want, **ident}:
                return True
        except (OSError, ValueError):
            pass
    try:
        got = sha256_file(path)
    except OSError as e:
        raise ModelError(f"{path}: cannot read the weights file: {e.strerror or e}") from None
    if got != want:
        raise WeightsDigestError(
            f"{path}: weights digest mismatch: expected sha256:{want}, file has sha256:{got}; "
            "refusing to serve (the file is corrupt or was replaced)"
        )
    if _identity(path) == ident:  # unchanged while it was hashed
        try:
            records.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"sha256": want, **ident}))
            tmp.replace(record)
        except OSError:
            pass  # a read-only filesystem: the next start hashes again, which is only slower
    return False
