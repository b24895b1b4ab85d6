"""The ``llmctl cache`` actions: fetch, list, verify and garbage-collect the weights cache.

The CLI calls these and prints what they return; other actions (install, build) call them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from manager import paths
from manager.blobstore import BlobInfo, BlobStore, parse_digest
from manager.errors import CacheError
from manager.fetch import DEFAULT_TIMEOUT, fetch


def open_store() -> BlobStore:
    """The blob store in the user's cache directory (``$LLMCTL_HOME/cache`` when set)."""
    return BlobStore(paths.cache_dir())


def fetch_blob(
    source: str,
    sha256: str,
    *,
    pin: str | None = None,
    progress: bool = True,
    retries: int = 5,
    timeout: float = DEFAULT_TIMEOUT,
    store: BlobStore | None = None,
) -> Path:
    """Fetch ``source`` into the cache unless already there (and intact), optionally pinning it."""
    store = store or open_store()
    digest = parse_digest(sha256)
    if pin is not None:
        store.pin_path(pin)  # reject a bad name before downloading gigabytes
    path = fetch(source, digest, store, progress=progress, retries=retries, timeout=timeout)
    if pin is not None:
        store.pin(pin, digest)
    return path


def list_blobs(store: BlobStore | None = None) -> list[BlobInfo]:
    """Every cached blob with its size, source and pin names."""
    return (store or open_store()).list()


@dataclass
class VerifyResult:
    digest: str
    ok: bool


def verify_blobs(digests: list[str] | None = None, store: BlobStore | None = None) -> list[VerifyResult]:
    """Re-hash the given blobs (all when none are given); corrupt ones are removed from the cache."""
    store = store or open_store()
    wanted = [parse_digest(d) for d in digests] if digests else store.digests()
    for digest in wanted:
        if not store.has(digest):
            raise CacheError(f"no blob {digest} in {store.blob_dir}; see `llmctl cache ls`")
    return [VerifyResult(digest, store.verify(digest)) for digest in wanted]


def collect_garbage(*, dry_run: bool = False, store: BlobStore | None = None) -> list[Path]:
    """Remove partial downloads and every blob that no pin names; returns the removed paths."""
    store = store or open_store()
    return store.gc(set(store.pins().values()), dry_run=dry_run)
