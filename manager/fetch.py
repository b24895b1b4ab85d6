"""Fetch a file into the blob store by digest: HTTP(S) with resume and retries, ``file://``, local paths.

The bytes are hashed while they stream into ``<hex>.partial``; only a download whose sha256 matches
the expected digest is renamed into the store. A blob that is already cached is re-verified before it
is reused, and re-fetched when it is corrupt.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit
from urllib.request import url2pathname

import requests

from manager.blobstore import CHUNK, BlobStore, hash_file, parse_digest
from manager.errors import DigestMismatchError, FetchError
from runtime.folio_writer import FolioWriter

DEFAULT_TIMEOUT = 30.0  # seconds without a byte before an attempt counts as stalled
DEFAULT_BACKOFF = 1.0  # first retry delay; doubles per attempt
MAX_BACKOFF = 30.0
RETRY_STATUS = frozenset({408, 429})
NET_CHUNK = 64 * 1024  # small enough that an interrupted transfer keeps almost everything it received
_SECRET_QUERY_KEY = re.compile(r"token|sig|signature|secret|password|passwd|key|auth|credential", re.I)
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def redact(url: str) -> str:
    """``url`` without userinfo and with secret-looking query values replaced, for messages and records."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.scheme not in ("http", "https", "file"):
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc += f":{port}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "REDACTED" if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs], safe="/:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# -- progress ---------------------------------------------------------------------------------------
class Reporter(Protocol):
    def start(self, label: str, total: int | None, done: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


class QuietReporter:
    def start(self, label: str, total: int | None, done: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass


class LineReporter:
    """Plain lines on stderr (not a TTY): the start, every 10% or 10 s, retries, the end."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.done = 0
        self.label = ""
        self._last_time = 0.0
        self._last_decile = -1

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, label: str, total: int | None, done: int) -> None:
        self.label, self.total, self.done = label, total, done
        self._last_time = time.monotonic()
        self._last_decile = -1
        size = f"{_human(total)}" if total is not None else "unknown size"
        resume = f", resuming at {_human(done)}" if done else ""
        self._print(f"fetching {label} ({size}{resume})")

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        decile = self.done * 10 // self.total if self.total else -1
        if decile > self._last_decile and self.total and self.done < self.total or now - self._last_time >= 10:
            self._last_decile, self._last_time = decile, now
            pct = f" {self.done * 100 // self.total}%" if self.total else ""
            self._print(f"  {_human(self.done)}{pct}")

    def note(self, message: str) -> None:
        self._print(message)

    def finish(self) -> None:
        self._print(f"fetched {self.label} ({_human(self.done)})")


class RichReporter:
    """A rich progress bar on a terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: Any = None

    def start(self, label: str, total: int | None, done: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(label, total=total, completed=done)
        else:
            self.progress.update(self.task, total=total, completed=done)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def finish(self) -> None:
        if self.task is not None:
            self.progress.stop()


def make_reporter(progress: bool) -> Reporter:
    if not progress:
        return QuietReporter()
    if sys.stderr.isatty():
        return RichReporter()
    return LineReporter()


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# -- fetching ---------------------------------------------------------------------------------------
class _Retry(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, reason: str, delay: float | None = None, *, progress: bool = False) -> None:
        super().__init__(reason)
        self.delay = delay
        self.progress = progress  # the attempt received some bytes: the failure count starts over


class _Restart(Exception):
    """The partial download cannot be resumed: start from byte 0 (immediately)."""


def _local_path(source: str) -> Path | None:
    """The path a ``file://`` URL or plain path names, or None for other URLs."""
    parts = urlsplit(source)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"unsupported file URL {redact(source)}: only local files (file:///path) can be read")
        return Path(url2pathname(unquote(parts.path)))
    if parts.scheme in ("http", "https"):
        return None
    if parts.scheme and len(parts.scheme) > 1 and "://" in source:
        raise FetchError(
            f"unsupported source {redact(source)}: use an https://, http:// or file:// URL or a local path"
        )
    return Path(source).expanduser()


def fetch(
    source: str,
    sha256: str,
    store: BlobStore,
    *,
    progress: bool = True,
    retries: int = 5,
    timeout: float = DEFAULT_TIMEOUT,
    backoff: float = DEFAULT_BACKOFF,
    max_backoff: float = MAX_BACKOFF,
    session: requests.Session | None = None,
    reporter: Reporter | None = None,
) -> Path:
    """Make sure the blob ``sha256`` is in ``store``, fetching it from ``source``; returns its path.

    ``timeout`` is both the connect timeout and the longest wait for the next bytes. ``retries`` is
    how many failed attempts in a row (connection errors, stalls, 5xx, 408, 429, truncated bodies)
    are retried, after ``backoff``, ``2 * backoff``, ... seconds (at most ``max_backoff``); an attempt
    that made progress resets the count.
    """
    digest = parse_digest(sha256)
    if store.has(digest):
        if store.verify(digest):
            return store.path(digest)
        # verify() removed the corrupt blob: fall through and fetch it again.
        if progress:
            print(f"cached blob {digest} was corrupt and has been removed; fetching it again", file=sys.stderr)
    rep = reporter if reporter is not None else make_reporter(progress)
    try:
        local = _local_path(source)
        if local is not None:
            _copy_local(local, source, digest, store, rep)
        else:
            _download(
                source,
                digest,
                store,
                rep,
                retries=retries,
                timeout=timeout,
                backoff=backoff,
                max_backoff=max_backoff,
                session=session,
            )
    finally:
        rep.finish()
    return store.path(digest)


def _check_and_commit(hasher: Any, digest: str, store: BlobStore, source: str) -> None:
    actual = "sha256:" + hasher.hexdigest()
    if actual != digest:
        store.partial_path(digest).unlink(missing_ok=True)
        raise DigestMismatchError(
            f"digest mismatch for {redact(source)}: expected {digest}, got {actual}; the download was "
            "deleted. Check the --sha256 value, or the source has changed."
        )
    store.commit(digest, source=redact(source))


def _copy_local(path: Path, source: str, digest: str, store: BlobStore, rep: Reporter) -> None:
    if not path.is_file():
        raise FetchError(f"cannot read {path}: no such file; check the path")
    hasher = hashlib.sha256()
    rep.start(str(path), path.stat().st_size, 0)
    try:
        with open(path, "rb") as src, store.open_partial(digest, append=False) as raw:
            dst = FolioWriter(raw)  # huge pages for the mapped model: see runtime/folio_writer.py
            while chunk := src.read(CHUNK):
                hasher.update(chunk)
                dst.write(chunk)
                rep.advance(len(chunk))
            dst.flush()
    except OSError as exc:
        store.partial_path(digest).unlink(missing_ok=True)
        raise FetchError(f"cannot copy {path} into the cache: {exc.strerror or exc}") from exc
    _check_and_commit(hasher, digest, store, path.resolve().as_uri())


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _download(
    url: str,
    digest: str,
    store: BlobStore,
    rep: Reporter,
    *,
    retries: int,
    timeout: float,
    backoff: float,
    max_backoff: float,
    session: requests.Session | None,
) -> None:
    shown = redact(url)
    http = session or requests.Session()
    failures = 0
    restarts = 0
    try:
        while True:
            partial = store.partial_path(digest)
            try:
                _attempt(url, digest, store, rep, http, timeout)
                return
            except _Restart as exc:
                partial.unlink(missing_ok=True)
                restarts += 1
                if restarts > retries + 1:
                    raise FetchError(f"cannot download {shown}: {exc}; giving up after {restarts} restarts") from None
                rep.note(f"{shown}: {exc}; restarting from the beginning")
                continue
            except _Retry as exc:
                failures = 1 if exc.progress else failures + 1
                if failures > retries:
                    raise FetchError(
                        f"cannot download {shown}: {exc} (gave up after {failures} attempts); "
                        "check the URL and your network, then run the command again to resume"
                    ) from None
                delay = min(max_backoff, backoff * 2 ** max(failures - 1, 0))
                if exc.delay is not None:
                    delay = min(max_backoff, max(delay, exc.delay))
                rep.note(f"{shown}: {exc}; retrying in {delay:.1f}s (attempt {failures + 1} of {retries + 1})")
                time.sleep(delay)
    finally:
        if session is None:
            http.close()


def _attempt(url: str, digest: str, store: BlobStore, rep: Reporter, http: requests.Session, timeout: float) -> None:
    shown = redact(url)
    partial = store.partial_path(digest)
    hasher = hashlib.sha256()
    offset = 0
    if partial.is_file():
        hash_file(partial, hasher)  # re-hash what is there: the digest covers every byte
        offset = partial.stat().st_size
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = http.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema) as e:
        raise FetchError(f"invalid URL {shown}: {e}") from None
    except requests.RequestException as exc:
        raise _Retry(_describe(exc)) from None

    with response:
        status = response.status_code
        if status == 416 and offset:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match and match.group(3) == str(offset):
                # The partial file already holds every byte (interrupted before the rename).
                _check_and_commit(hasher, digest, store, url)
                return
            raise _Restart("the server refused to resume (HTTP 416)")
        if status >= 500 or status in RETRY_STATUS:
            raise _Retry(f"HTTP {status} {response.reason or ''}".rstrip(), _retry_after(response))
        if status >= 400:
            raise FetchError(
                f"cannot download {shown}: HTTP {status} {response.reason or ''}".rstrip()
                + ("; check the URL" if status == 404 else "; check the URL and your access to it")
            )
        if status not in (200, 206):
            raise FetchError(f"cannot download {shown}: unexpected HTTP {status}")

        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        append = False
        if offset and status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or match.group(1) != str(offset):
                raise _Restart("the server answered a different byte range than asked")
            append = True
            total = int(match.group(3)) if match.group(3) != "*" else None
        elif status == 206:
            raise _Restart("the server sent a partial response to a full request")
        else:
            if offset:
                rep.note(f"{shown}: the server does not support resuming; downloading from the beginning")
                hasher = hashlib.sha256()
                offset = 0
            total = length
        rep.start(shown, total, offset)

        received = 0
        try:
            with store.open_partial(digest, append=append) as raw:
                out = FolioWriter(raw)  # huge pages for the mapped model: see runtime/folio_writer.py
                try:
                    for chunk in response.iter_content(NET_CHUNK):
                        if not chunk:
                            continue
                        out.write(chunk)
                        hasher.update(chunk)
                        received += len(chunk)
                        rep.advance(len(chunk))
                finally:  # an interrupted transfer keeps everything it received
                    out.flush()
        except requests.RequestException as exc:
            raise _Retry(_describe(exc), progress=received > 0) from None
        except OSError as exc:
            raise FetchError(f"cannot write to the cache at {partial}: {exc.strerror or exc}") from exc
        if length is not None and received < length:
            raise _Retry(f"the body ended after {received} of {length} bytes", progress=received > 0)
    _check_and_commit(hasher, digest, store, url)


def _describe(exc: requests.RequestException) -> str:
    text = str(exc)
    if isinstance(exc, requests.exceptions.ConnectionError) and "timed out" in text.lower():
        return "the connection stalled (read timeout)"
    if isinstance(exc, requests.exceptions.Timeout):
        return "the connection timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection closed before the body was complete"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection failed"
    return type(exc).__name__
