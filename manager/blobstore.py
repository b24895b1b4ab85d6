"""A content-addressed store for weight files: ``<root>/blobs/sha256/<hex>``.

Each complete blob has a small JSON sidecar ``<hex>.json`` beside it (source URL without
credentials, size, fetch time). Downloads in progress live in ``<hex>.partial`` until their digest
is checked; only then are they renamed into place, so a blob path that exists always held the right
bytes when it was written. Pins (``<root>/pins/<name>``, one digest per file) protect blobs from
``gc``. Every write is atomic: a temporary file in the same directory, then a rename.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from manager.errors import CacheError, DigestFormatError

ALGORITHM = "sha256"
CHUNK = 1 << 20
PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".json"
_HEX = re.compile(r"[0-9a-f]{64}")
_PIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def parse_digest(digest: str) -> str:
    """Return the canonical ``sha256:<hex>`` form of ``digest`` (bare 64-hex is accepted too)."""
    text = digest.strip()
    algorithm, sep, hexpart = text.partition(":")
    if not sep:
        algorithm, hexpart = ALGORITHM, text
    hexpart = hexpart.lower()
    if algorithm.lower() != ALGORITHM or not _HEX.fullmatch(hexpart):
        raise DigestFormatError(
            f"invalid digest {digest!r}: expected 'sha256:' followed by 64 hex digits "
            "(for example the output of `sha256sum FILE`)"
        )
    return f"{ALGORITHM}:{hexpart}"


def hex_of(digest: str) -> str:
    """The 64 hex digits of a validated digest."""
    return parse_digest(digest).split(":", 1)[1]


def hash_file(path: Path, hasher: Any | None = None, on_chunk: Callable[[int], None] | None = None) -> Any:
    """Feed the whole file to ``hasher`` (a new sha256 by default) and return it."""
    h = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return h


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class BlobInfo:
    """One complete blob in the store."""

    digest: str
    path: Path
    size: int
    source: str | None = None
    fetched: str | None = None
    pins: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "size": self.size,
            "source": self.source,
            "fetched": self.fetched,
            "pins": self.pins,
            "path": str(self.path),
        }


class BlobStore:
    """The blob store rooted at a cache directory (``blobs/`` and ``pins/`` live under it)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / ALGORITHM
        self.pin_dir = self.root / "pins"

    # -- paths -------------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        """Where the blob with ``digest`` lives (whether or not it is there)."""
        return self.blob_dir / hex_of(digest)

    def partial_path(self, digest: str) -> Path:
        """Where a download of ``digest`` in progress is kept."""
        return self.blob_dir / (hex_of(digest) + PARTIAL_SUFFIX)

    def sidecar_path(self, digest: str) -> Path:
        return self.blob_dir / (hex_of(digest) + SIDECAR_SUFFIX)

    def has(self, digest: str) -> bool:
        """Whether a complete blob for ``digest`` is present (not re-hashed: see `verify`)."""
        return self.path(digest).is_file()

    def metadata(self, digest: str) -> dict[str, Any]:
        """The sidecar of a blob, or ``{}`` when it is missing or unreadable."""
        try:
            data = json.loads(self.sidecar_path(digest).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # -- writing -----------------------------------------------------------------------------
    def open_partial(self, digest: str, *, append: bool) -> BinaryIO:
        """Open the partial download file of ``digest`` for appending or from scratch."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        return open(self.partial_path(digest), "ab" if append else "wb")

    def commit(self, digest: str, *, source: str | None) -> Path:
        """Move a checked partial download into place and write its sidecar; returns the blob path."""
        partial, final = self.partial_path(digest), self.path(digest)
        size = partial.stat().st_size
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        meta = {
            "digest": parse_digest(digest),
            "size": size,
            "source": source,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # The sidecar goes first: a blob without one still works, a sidecar without a blob is ignored.
        atomic_write_bytes(self.sidecar_path(digest), (json.dumps(meta, indent=2) + "\n").encode())
        os.replace(partial, final)
        return final

    def remove(self, digest: str) -> None:
        """Delete a blob, its sidecar and any partial download of it."""
        for p in (self.path(digest), self.sidecar_path(digest), self.partial_path(digest)):
            p.unlink(missing_ok=True)

    # -- checking ----------------------------------------------------------------------------
    def verify(self, digest: str) -> bool:
        """Re-hash a cached blob; a corrupt one is removed (never reused) and ``False`` returned.

        Raises `CacheError` when there is no such blob.
        """
        digest = parse_digest(digest)
        blob = self.path(digest)
        if not blob.is_file():
            raise CacheError(f"no blob {digest} in {self.blob_dir}; see `llmctl cache ls`")
        expected_size = self.metadata(digest).get("size")
        if isinstance(expected_size, int) and blob.stat().st_size != expected_size:
            self.remove(digest)
            return False
        actual = "sha256:" + hash_file(blob).hexdigest()
        if actual != digest:
            self.remove(digest)
            return False
        return True

    # -- listing -----------------------------------------------------------------------------
    def digests(self) -> builtins.list[str]:
        """Digests of the complete blobs, sorted."""
        if not self.blob_dir.is_dir():
            return []
        return sorted(
            f"{ALGORITHM}:{p.name}" for p in self.blob_dir.iterdir() if _HEX.fullmatch(p.name) and p.is_file()
        )

    def list(self) -> builtins.list[BlobInfo]:
        """Every complete blob with its size, source and pin names."""
        by_digest: dict[str, builtins.list[str]] = {}
        for name, digest in self.pins().items():
            by_digest.setdefault(digest, []).append(name)
        infos = []
        for digest in self.digests():
            meta = self.metadata(digest)
            path = self.path(digest)
            infos.append(
                BlobInfo(
                    digest=digest,
                    path=path,
                    size=path.stat().st_size,
                    source=meta.get("source"),
                    fetched=meta.get("fetched"),
                    pins=sorted(by_digest.get(digest, [])),
                )
            )
        return infos

    # -- pins --------------------------------------------------------------------------------
    def pin_path(self, name: str) -> Path:
        """The file of pin ``name``; raises `CacheError` for a name that is not allowed."""
        if not _PIN_NAME.fullmatch(name):
            raise CacheError(
                f"invalid pin name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        return self.pin_dir / name

    def pin(self, name: str, digest: str) -> None:
        """Protect ``digest`` from ``gc`` under ``name`` (replacing what ``name`` pinned before)."""
        atomic_write_bytes(self.pin_path(name), (parse_digest(digest) + "\n").encode())

    def unpin(self, name: str) -> None:
        """Remove the pin ``name``; raises `CacheError` when there is none."""
        path = self.pin_path(name)
        if not path.is_file():
            raise CacheError(f"no pin named {name!r} in {self.pin_dir}")
        path.unlink()

    def pins(self) -> dict[str, str]:
        """Pin name -> digest. Unreadable pin files are skipped (and keep nothing)."""
        result: dict[str, str] = {}
        if not self.pin_dir.is_dir():
            return result
        for p in sorted(self.pin_dir.iterdir()):
            if not p.is_file() or not _PIN_NAME.fullmatch(p.name):
                continue
            try:
                result[p.name] = parse_digest(p.read_text())
            except (OSError, DigestFormatError):
                continue
        return result

    # -- garbage collection ------------------------------------------------------------------
    def gc(self, keep: Iterable[str], *, dry_run: bool = False) -> builtins.list[Path]:
        """Remove partial downloads, temporary files and blobs whose digest is not in ``keep``.

        Returns the removed paths (or, with ``dry_run``, the paths that would be removed).
        """
        kept = {hex_of(d) for d in keep}
        removed: builtins.list[Path] = []
        if not self.blob_dir.is_dir():
            return removed
        for p in sorted(self.blob_dir.iterdir()):
            name = p.name
            stem = name.removesuffix(SIDECAR_SUFFIX)
            if _HEX.fullmatch(stem) and stem in kept and (name == stem or (self.blob_dir / stem).is_file()):
                continue  # a kept blob, or the sidecar of one
            if not p.is_file():
                continue
            removed.append(p)
            if not dry_run:
                p.unlink(missing_ok=True)
        return removed
