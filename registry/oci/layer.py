"""A reproducible layer: a sorted, fixed-time, numeric-owner tar, gzipped without a timestamp.

The bytes of a layer depend only on its entries (path, content, mode, uid/gid, kind), never on the
files' mtimes, atimes, owners on disk, the order they were created or listed in, or the clock:

- entries sorted by path; missing parent directories added (mode 0755, root);
- every mtime = SOURCE_DATE_EPOCH (or 0), uname/gname empty, uid/gid as given;
- GNU tar format (no PAX headers, which would carry atime/ctime), as Python's tarfile writes it;
- gzip with mtime 0, no file name, compresslevel 6.

`diff_id` (sha256 of the tar) depends only on the entries. `digest` (sha256 of the gzip blob)
additionally depends on zlib's output for level 6, which is stable for a given zlib build.
Files are streamed through both hashes into a blob on disk: weights of several GB never sit in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from registry.oci.errors import BlobVerificationError, LayerEntryError

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
GZIP_LEVEL = 6
CHUNK = 1 << 20


def source_date_epoch() -> int:
    """The fixed timestamp of every build: `SOURCE_DATE_EPOCH` if set (reproducible-builds.org), else 0."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    try:
        epoch = int(value)
    except ValueError:
        raise LayerEntryError(f"SOURCE_DATE_EPOCH={value!r} is not an integer number of seconds") from None
    if epoch < 0:
        raise LayerEntryError(f"SOURCE_DATE_EPOCH={value!r} is negative")
    return epoch


def _clean_path(path: str) -> str:
    """`/usr/bin/x`, `usr/bin/x/` and `./usr/bin/x` all name `usr/bin/x`; `..` may not escape the root."""
    cleaned = posixpath.normpath("/" + path.strip()).lstrip("/")
    if not cleaned or cleaned == ".":
        raise LayerEntryError(f"layer entry path {path!r} names the root directory")
    if any(part == ".." for part in path.split("/")):
        raise LayerEntryError(f"layer entry path {path!r} contains '..'")
    return cleaned


@dataclass(frozen=True)
class Entry:
    """One file, directory or symlink of a layer. Use `Entry.file`, `Entry.dir` or `Entry.symlink`.

    Mode and owner are what the image shows, never taken from the file on disk.
    """

    path: str
    kind: Literal["file", "dir", "symlink"]
    source: Path | None = None
    data: bytes | None = None
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0

    @classmethod
    def file(
        cls,
        path: str,
        source: str | os.PathLike[str] | None = None,
        *,
        data: bytes | None = None,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
    ) -> Entry:
        """A regular file from `source` on disk (streamed) or from `data` bytes: exactly one of the two."""
        if (source is None) == (data is None):
            raise LayerEntryError(f"layer file {path!r} needs exactly one of source= or data=")
        src = Path(source) if source is not None else None
        return cls(_clean_path(path), "file", source=src, data=data, mode=mode, uid=uid, gid=gid)

    @classmethod
    def dir(cls, path: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
        return cls(_clean_path(path), "dir", mode=mode, uid=uid, gid=gid)

    @classmethod
    def symlink(cls, path: str, target: str, *, uid: int = 0, gid: int = 0) -> Entry:
        if not target:
            raise LayerEntryError(f"symlink {path!r} has an empty target")
        return cls(_clean_path(path), "symlink", target=target, mode=0o777, uid=uid, gid=gid)


def _with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """Entries sorted by path, duplicates refused, missing parent directories added as 0755 root."""
    by_path: dict[str, Entry] = {}
    for entry in entries:
        if entry.path in by_path:
            raise LayerEntryError(f"layer entry {entry.path!r} is given twice")
        by_path[entry.path] = entry
    for path in list(by_path):
        parent = posixpath.dirname(path)
        while parent:
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = Entry.dir(parent)
            elif existing.kind != "dir":
                raise LayerEntryError(f"layer entry {path!r} is below {parent!r}, which is not a directory")
            parent = posixpath.dirname(parent)
    return [by_path[p] for p in sorted(by_path)]


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `sink` (None: hash only)."""

    def __init__(self, sink: BinaryIO | None) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b)
        self.sha.update(view)
        self.size += len(view)
        if self.sink is not None:
            self.sink.write(view)
        return len(view)


class _Tee(io.RawIOBase):
    """Writes to two streams: the uncompressed tar's hash and the gzip compressor."""

    def __init__(self, first: _HashingWriter, second: gzip.GzipFile) -> None:
        self.first = first
        self.second = second

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.first.write(b)
        self.second.write(b)
        return len(b)


def _tarinfo(entry: Entry, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.mtime = mtime
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
    return info


def _add_file(tar: tarfile.TarFile, entry: Entry, info: tarfile.TarInfo) -> None:
    if entry.data is not None:
        info.size = len(entry.data)
        tar.addfile(info, io.BytesIO(entry.data))
        return
    assert entry.source is not None
    with open(entry.source, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LayerEntryError(f"layer file {entry.path!r}: source {entry.source} is not a regular file")
        info.size = st.st_size
        tar.addfile(info, f)  # tarfile raises if the file shrinks while being read


@dataclass(frozen=True)
class Layer:
    """A gzipped tar blob on disk with its digests. Build one with `Layer.from_entries`.

    `digest` and `size` describe the compressed blob (what a manifest lists); `diff_id` is the sha256
    of the uncompressed tar (what the image config's rootfs lists, and what Docker keys layers by).
    """

    path: Path
    digest: str
    size: int
    diff_id: str
    media_type: str = LAYER_MEDIA_TYPE

    @classmethod
    def from_entries(cls, entries: Iterable[Entry], workdir: str | os.PathLike[str]) -> Layer:
        """Write the layer blob as `<workdir>/<hex>.tar.gz` and return it. Does not touch any cache or store."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        mtime = source_date_epoch()
        fd, tmp_name = tempfile.mkstemp(prefix=".layer-", suffix=".partial", dir=workdir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                compressed = _HashingWriter(out)
                uncompressed = _HashingWriter(None)
                with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="", compresslevel=GZIP_LEVEL) as gz:
                    tee = _Tee(uncompressed, gz)
                    with tarfile.open(fileobj=tee, mode="w|", format=tarfile.GNU_FORMAT, bufsize=CHUNK) as tar:
                        for entry in _with_parents(entries):
                            info = _tarinfo(entry, mtime)
                            if entry.kind == "file":
                                _add_file(tar, entry, info)
                            else:
                                tar.addfile(info)
            hexdigest = compressed.sha.hexdigest()
            final = workdir / f"{hexdigest}.tar.gz"
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return cls(
            path=final,
            digest=f"sha256:{hexdigest}",
            size=compressed.size,
            diff_id=f"sha256:{uncompressed.sha.hexdigest()}",
        )

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def open_compressed(self) -> BinaryIO:
        """The blob as stored (gzip). Not verified here: `verify()` or the layout reader does that."""
        return open(self.path, "rb")

    def iter_uncompressed(self) -> Iterator[bytes]:
        """The tar's bytes in chunks, decompressed while reading."""
        with gzip.open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def verify(self, *, check_diff_id: bool = True) -> None:
        """Re-hash the blob (and, by default, its decompressed tar); raise naming the digest on a mismatch."""
        if not self.path.is_file():
            raise BlobVerificationError(f"blob {self.digest} is missing: {self.path} does not exist")
        sha, size = hashlib.sha256(), 0
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                size += len(chunk)
        got = f"sha256:{sha.hexdigest()}"
        if got != self.digest or size != self.size:
            raise BlobVerificationError(
                f"blob {self.digest} ({self.size} bytes) at {self.path} has digest {got} ({size} bytes): "
                "it is corrupt or was altered; refusing it (write the image again)"
            )
        if check_diff_id:
            self.verify_diff_id()

    def verify_diff_id(self) -> None:
        """Decompress the blob and check the tar's sha256 against `diff_id` (the blob itself is not re-hashed)."""
        tar_sha = hashlib.sha256()
        try:
            for chunk in self.iter_uncompressed():
                tar_sha.update(chunk)
        except (OSError, EOFError) as e:
            raise BlobVerificationError(f"layer {self.digest} does not decompress: {e}") from None
        if f"sha256:{tar_sha.hexdigest()}" != self.diff_id:
            raise BlobVerificationError(
                f"layer {self.digest} decompresses to sha256:{tar_sha.hexdigest()}, "
                f"but the image config lists diff_id {self.diff_id}"
            )
