"""Weights derived here from a pinned file: `derive: {requantize: Q4_0}` in a manifest.

No Q4 digests are published for the StarCoder models, so the `-q4` charts pin the Q8_0 file and
derive the Q4_0 one with the runtime's deterministic requantizer: the same source gives the same
bytes on every machine. The result goes into the blob store like a download, and a record
(`derived/<source hex>-<type>`) remembers which blob a source gave, so the work is done once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from manager.blobstore import hex_of
from manager.cache import open_store
from manager.errors import ImageBuildError


def _record(source_sha256: str, target: str) -> str:
    return f"derived-{hex_of(source_sha256)}-{target.lower()}"


def requantized(source: Path, source_sha256: str, target: str, *, pin: str, progress: bool = True) -> tuple[Path, str]:
    """The blob of `source` requantized to `target` (made now, or found from an earlier run and
    re-verified); returns (path, sha256:<hex>) and pins it under `pin`."""
    from runtime.errors import ModelError
    from runtime.requantize import requantize

    store = open_store()
    record = _record(source_sha256, target)
    known = store.pins().get(record)
    if known is not None and store.has(known) and store.verify(known):
        store.pin(pin, known)
        return store.path(known), known
    store.blob_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".derive-", suffix=".gguf", dir=store.blob_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if progress:
            print(f"deriving {target} weights from {source_sha256} (once; the result is cached)", flush=True)
        result = requantize(source, tmp, target)
        digest = "sha256:" + result.sha256.removeprefix("sha256:")
        os.replace(tmp, store.partial_path(digest))
        store.commit(digest, source=f"requantize {target} of {source_sha256}")
    except ModelError as e:
        raise ImageBuildError(f"cannot derive {target} weights from {source}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    store.pin(record, digest)
    store.pin(pin, digest)
    return store.path(digest), digest
