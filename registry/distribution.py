"""A client for OCI registries (distribution-spec v1.1): blobs, manifests, tags and referrers.

One `RegistryClient` per registry. Layers, one concern each (httpx's shape):

- transport (`_send`): TLS verified against the system CAs (``/etc/ssl/certs``) or only `ca_file`,
  plain HTTP only when asked and only to loopback (or with `insecure`); no proxy or ``.netrc`` from the
  environment; network and TLS failures become `RegistryUnavailableError` / `RegistryTLSError`;
- auth (`_request`): a 401's ``WWW-Authenticate`` picks Basic (send the credentials) or Bearer (get a
  token from the realm for the request's scopes, cache it until ``expires_in``, and fetch a fresh one
  once when the registry refuses a cached one); an ``Authorization`` header is only ever sent to the
  registry's own host;
- errors (`_error`): every failure is one `RegistryError` line naming the method and URL (without its
  query, which may carry upload state) and the registry's status and JSON error code;
- operations: every blob and manifest read is verified against its digest (and size) while it streams,
  and nothing unverified is kept: `get_blob(dest=...)` writes a temporary file next to `dest` and
  renames it only after the digest matched. Uploads hash what they send and refuse to commit a blob
  whose source does not match its digest.

Chunked uploads are resumable: when a ``PATCH`` dies mid-way, the client asks the upload's status
(``GET <location>`` -> ``Range: 0-<last>``) and continues from there; a registry that cancelled the
session (distribution 2.8.2 does when a broken ``PATCH`` left extra bytes behind) gets a new one
and the blob is sent again from its start. `resume_upload` continues a session from another process.

What this does not do: retry 5xx answers, follow the referrers API's pagination, or speak Docker
schema 1.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import requests

from registry.credentials import Credentials
from registry.errors import (
    BlobUnknownError,
    InvalidReferenceError,
    ManifestFormatError,
    ManifestUnknownError,
    RegistryAuthError,
    RegistryError,
    RegistryHTTPError,
    RegistryTLSError,
    RegistryUnavailableError,
    UploadInterruptedError,
)
from registry.oci.errors import BlobVerificationError
from registry.reference import REGISTRY_RE, check_digest, check_repository, check_tag, is_digest

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
OCTET_STREAM = "application/octet-stream"

DEFAULT_CHUNK_SIZE = 8 << 20
READ_CHUNK = 1 << 20
MAX_MANIFEST_SIZE = 4 << 20
MAX_ERROR_BODY = 64 << 10
MAX_RESUMES = 3
DEFAULT_TOKEN_TTL = 60  # seconds, when a token server gives no expires_in (token auth spec)
TOKEN_MARGIN = 2.0


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


BlobSource = Path | bytes | Readable


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def referrers_tag(digest: str) -> str:
    """``sha256-<hex>``: the tag of the referrers fallback index for `digest` (distribution-spec v1.1)."""
    algorithm, _, hexdigest = check_digest(digest).partition(":")
    return f"{algorithm}-{hexdigest}"


def redact(url: str) -> str:
    """The URL without user info or query string (upload locations carry state; never print secrets)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _with_query(url: str, params: Mapping[str, str]) -> str:
    """`url` with `params` appended to its query, which is kept byte for byte (opaque upload state)."""
    parts = urlsplit(url)
    extra = urlencode(params)
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip()


def referrer_descriptor(manifest: bytes, media_type: str) -> dict[str, Any]:
    """The descriptor a referrers index lists for `manifest`: with artifactType and annotations."""
    doc = json_object(manifest, "referrer manifest")
    descriptor: dict[str, Any] = {"mediaType": media_type, "digest": sha256_digest(manifest), "size": len(manifest)}
    artifact_type = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
    if artifact_type:
        descriptor["artifactType"] = artifact_type
    if doc.get("annotations"):
        descriptor["annotations"] = doc["annotations"]
    return descriptor


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """`data` as a JSON object; ManifestFormatError naming `what` otherwise."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ManifestFormatError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestFormatError(f"{what} is not a JSON object")
    return doc


def index_manifest(manifests: Sequence[Mapping[str, Any]]) -> bytes:
    """An OCI image index listing `manifests` (compact JSON, keys in the order the spec lists them)."""
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [dict(m) for m in manifests]}
    return json.dumps(doc, separators=(",", ":")).encode()


class VerifyingReader:
    """Reads `chunks` and checks their sha256 and length against `digest` and `size` (when known).

    Reading past `size` bytes, or reaching the end with another digest or length, raises
    `BlobVerificationError` naming `where` and both digests; `verified` turns true only at a good end.
    """

    def __init__(self, chunks: Iterator[bytes], digest: str, size: int | None, where: str) -> None:
        self._chunks = chunks
        self._sha = hashlib.sha256()
        self._buffer = b""
        self._eof = False
        self.digest = digest
        self.size = size
        self.where = where
        self.count = 0
        self.verified = False

    def _fail(self, detail: str) -> BlobVerificationError:
        return BlobVerificationError(
            f"{self.where}: blob {self.digest}{f' ({self.size} bytes)' if self.size is not None else ''} {detail}; "
            "refused, nothing kept"
        )

    def _pull(self) -> bool:
        for chunk in self._chunks:
            if not chunk:
                continue
            self.count += len(chunk)
            if self.size is not None and self.count > self.size:
                raise self._fail(f"is longer than its descriptor says (more than {self.size} bytes arrived)")
            self._sha.update(chunk)
            self._buffer += chunk
            return True
        if not self._eof:
            self._eof = True
            got = f"sha256:{self._sha.hexdigest()}"
            if got != self.digest or (self.size is not None and self.count != self.size):
                raise self._fail(f"arrived with digest {got} ({self.count} bytes)")
            self.verified = True
        return False

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            while self._pull():
                pass
            data, self._buffer = self._buffer, b""
            return data
        while len(self._buffer) < n and self._pull():
            pass
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data


@dataclass
class _Token:
    value: str
    expires_at: float  # time.monotonic()
    issued_at: str = ""


@dataclass
class _Challenge:
    scheme: str  # "basic", "bearer" or "none" (the registry needs no auth)
    params: dict[str, str] = field(default_factory=dict)


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str | None) -> _Challenge | None:
    """``Bearer realm="...",service="...",scope="..."`` -> its scheme (lowercased) and parameters."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return _Challenge(scheme.lower(), params)


def system_ca_bundle() -> str | bool:
    """The system's CA bundle (where ``update-ca-certificates`` puts an internal CA; ``SSL_CERT_FILE``
    wins), else True: requests' own (certifi) bundle."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return candidate
    if paths.capath and os.path.isdir(paths.capath):
        return paths.capath
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host(registry: str) -> str:
    if registry.startswith("["):
        return registry[: registry.index("]") + 1]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def _tls_problem(error: Exception) -> str:
    """What went wrong in a TLS handshake, and what to do about it."""
    text = str(error)
    fix = "pass --ca-file with the registry's CA certificate (or --insecure to skip verification)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        if "self-signed" in text or "unable to get local issuer" in text:
            return f"its certificate is signed by an unknown CA; {fix}"
        if "match" in text or "mismatch" in text:
            return f"its certificate is not valid for this host name; {fix}"
        return f"its certificate does not verify; {fix}"
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return "it does not speak TLS on this port (a plain-HTTP registry? allowed only on loopback or with --insecure)"
    return f"{text[:200]}; {fix}"


class _Source:
    """A blob source read from its start; rewound (when it can be) for a new upload session."""

    def __init__(self, source: BlobSource, size: int, where: str) -> None:
        self.size = size
        self.where = where
        self._path = source if isinstance(source, Path) else None
        self._bytes = source if isinstance(source, bytes) else None
        self._stream: Readable | None = None if isinstance(source, Path | bytes) else source
        self._file: BinaryIO | None = None
        self._pos = 0
        if self._path is not None:
            try:
                actual = self._path.stat().st_size
            except OSError as e:
                raise RegistryError(f"{where}: cannot read {self._path}: {e.strerror}") from None
            if actual != size:
                raise BlobVerificationError(f"{where}: {self._path} has {actual} bytes, its descriptor says {size}")
        if self._bytes is not None and len(self._bytes) != size:
            raise BlobVerificationError(f"{where}: {len(self._bytes)} bytes given, the descriptor says {size}")

    @property
    def rewindable(self) -> bool:
        if self._stream is None:
            return True
        seekable = getattr(self._stream, "seekable", None)
        return bool(seekable and seekable())

    def rewind(self) -> None:
        if self._stream is not None:
            if not self.rewindable:
                raise RegistryError(f"{self.where}: its source is a stream that cannot be read again; copy it again")
            self._stream.seek(0)  # type: ignore[attr-defined]
        elif self._file is not None:
            self._file.seek(0)
        self._pos = 0

    def _reader(self) -> Readable:
        if self._stream is not None:
            return self._stream
        if self._file is None:
            assert self._path is not None
            self._file = open(self._path, "rb")  # noqa: SIM115 (closed by close())
        return self._file

    def read(self, n: int) -> bytes:
        """The next `n` bytes (fewer only at `size`); a source that ends early is an error."""
        n = min(n, self.size - self._pos)
        if n <= 0:
            return b""
        if self._bytes is not None:
            data = self._bytes[self._pos : self._pos + n]
        else:
            reader, parts, want = self._reader(), [], n
            while want and (part := reader.read(want)):
                parts.append(part)
                want -= len(part)
            data = b"".join(parts)
        if len(data) != n:
            raise BlobVerificationError(
                f"{self.where}: the source ended after {self._pos + len(data)} of {self.size} bytes"
            )
        self._pos += n
        return data

    def check_end(self) -> None:
        """A stream must end at `size` (reading its end also runs a VerifyingReader's check)."""
        if self._stream is not None and self._stream.read(1):
            raise BlobVerificationError(f"{self.where}: the source is longer than the {self.size} bytes described")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class RegistryClient:
    """One registry (``host[:port]``): blobs, manifests, tags and referrers of its repositories.

    `registry` is ``host[:port]`` (no scheme). `credentials` None means anonymous. Tokens are cached
    under a lock, so threads may share a client for parallel transfers. Every method raises a
    `RegistryError` subclass, never a `requests` exception.
    """

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        ca_file: Path | None = None,
        insecure: bool = False,
        plain_http: bool = False,
        timeout: float = 30,
        user_agent: str = "llmctl",
    ) -> None:
        if not REGISTRY_RE.fullmatch(registry):
            raise InvalidReferenceError(f"invalid registry {registry!r}: expected host[:port], without a scheme")
        self.registry = registry
        self.credentials = credentials
        self.insecure = insecure
        self.timeout = timeout
        host = _split_host(registry)
        if plain_http and not (_is_loopback(host) or insecure):
            raise RegistryTLSError(
                f"refusing plain HTTP to {registry}: only loopback registries may be used without TLS "
                "(pass --insecure to allow it anyway)"
            )
        if ca_file is not None and not Path(ca_file).is_file():
            raise RegistryTLSError(f"CA file {ca_file} does not exist (--ca-file)")
        self.base_url = f"{'http' if plain_http else 'https'}://{registry}"
        self._netloc = urlsplit(self.base_url).netloc
        self._session = requests.Session()
        self._session.verify = False if insecure else (str(ca_file) if ca_file else system_ca_bundle())
        # Not from the environment: proxies (registries are internal) and ~/.netrc, whose credentials
        # would replace the Authorization header this client sets.
        self._session.trust_env = False
        self._session.headers.update({"User-Agent": user_agent, "Accept-Encoding": "identity"})
        self._lock = threading.Lock()
        self._challenge: _Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._referrers_api: dict[str, bool] = {}

    def __repr__(self) -> str:
        user = self.credentials.username if self.credentials else None
        return f"RegistryClient({self.base_url!r}, user={user!r})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------

    def _url(self, path_or_url: str) -> str:
        return path_or_url if "://" in path_or_url else self.base_url + path_or_url

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        data: bytes | None,
        params: Mapping[str, Any] | Sequence[tuple[str, str]] | None,
        stream: bool,
    ) -> requests.Response:
        log.debug("%s %s", method, redact(url))
        try:
            with warnings.catch_warnings():
                if self.insecure:
                    warnings.simplefilter("ignore")  # urllib3's InsecureRequestWarning: the user asked for it
                return self._session.request(
                    method,
                    url,
                    headers=dict(headers),
                    data=data,
                    params=params,
                    stream=stream,
                    timeout=self.timeout,
                    allow_redirects=method in ("GET", "HEAD"),
                )
        except requests.exceptions.SSLError as e:
            raise RegistryTLSError(f"TLS to {redact(url)} failed: {_tls_problem(e)}") from None
        except (requests.ConnectionError, requests.Timeout) as e:
            kind = "timed out" if isinstance(e, requests.Timeout) else "connection failed"
            raise RegistryUnavailableError(f"{method} {redact(url)}: {kind} ({type(e).__name__})") from None
        except requests.RequestException as e:
            raise RegistryError(f"{method} {redact(url)}: {type(e).__name__}: {str(e)[:200]}") from None

    # -- auth -------------------------------------------------------------------------------------

    def _same_host(self, url: str) -> bool:
        return urlsplit(url).netloc == self._netloc

    def _discover(self) -> None:
        """Learn the auth scheme from ``GET /v2/`` (before sending a body that a 401 would waste)."""
        resp = self._send("GET", self._url("/v2/"), {}, None, None, False)
        resp.close()
        with self._lock:
            if self._challenge is None:
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate")) if resp.status_code == 401 else None
                self._challenge = challenge or _Challenge("none")

    def _authorization(self, url: str, scopes: tuple[str, ...]) -> str | None:
        if not self._same_host(url):
            return None
        challenge = self._challenge
        if challenge is None or challenge.scheme == "none":
            return None
        if challenge.scheme == "basic":
            return self.credentials.basic() if self.credentials else None
        if challenge.scheme == "bearer":
            with self._lock:
                token = self._tokens.get(scopes)
            if token is None or time.monotonic() >= token.expires_at - TOKEN_MARGIN:
                token = self._fetch_token(scopes, challenge)
            return f"Bearer {token.value}"
        return None

    def _fetch_token(self, scopes: tuple[str, ...], challenge: _Challenge) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryAuthError(f"registry {self.registry} asked for a Bearer token without naming a realm")
        realm_parts = urlsplit(realm)
        if realm_parts.scheme != "https" and not (_is_loopback(realm_parts.hostname or "") or self.insecure):
            raise RegistryTLSError(
                f"registry {self.registry} sends credentials to the plain-HTTP token server {redact(realm)}; "
                "refusing (pass --insecure to allow it)"
            )
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        params += [("scope", s) for s in scopes]
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        resp = self._send("GET", realm, headers, None, params, False)
        if resp.status_code in (401, 403):
            raise RegistryAuthError(
                f"token server {redact(realm)} of registry {self.registry} refused "
                f"{self._who()} ({resp.status_code}); {self._login_hint()}",
                url=redact(realm),
                status=resp.status_code,
            )
        if resp.status_code != 200:
            raise self._error(resp, "GET", realm)
        try:
            doc = resp.json()
            value = str(doc.get("token") or doc.get("access_token") or "")
            expires_in = float(doc.get("expires_in") or DEFAULT_TOKEN_TTL)
        except (ValueError, TypeError, AttributeError):
            raise RegistryAuthError(f"token server {redact(realm)} answered something other than a token") from None
        if not value:
            raise RegistryAuthError(f"token server {redact(realm)} answered without a token")
        token = _Token(value, time.monotonic() + max(expires_in, 0.0), str(doc.get("issued_at", "")))
        with self._lock:
            self._tokens[scopes] = token
        return token

    def _who(self) -> str:
        return f"the credentials of user {self.credentials.username!r}" if self.credentials else "anonymous access"

    def _login_hint(self) -> str:
        if self.credentials:
            return f"check them with `llmctl registry login {self.registry}`"
        return f"log in with `llmctl registry login {self.registry}`"

    def _on_unauthorized(self, resp: requests.Response, scopes: tuple[str, ...], sent: str | None) -> bool:
        """After a 401: update the auth state; True when a retry may succeed."""
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
        if challenge is None:
            return False
        if challenge.scheme == "basic":
            with self._lock:
                self._challenge = challenge
            return self.credentials is not None and not (sent or "").startswith("Basic ")
        if challenge.scheme == "bearer":
            with self._lock:
                self._challenge = challenge
                self._tokens.pop(scopes, None)  # expired or revoked: get a fresh one, once
            wanted = tuple(sorted(set(scopes) | set(challenge.params.get("scope", "").split())))
            token = self._fetch_token(wanted, challenge)
            with self._lock:
                self._tokens[scopes] = token
            return True
        return False

    def _request(
        self,
        method: str,
        path_or_url: str,
        *,
        scopes: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        stream: bool = False,
        ok: Sequence[int] = (200,),
    ) -> requests.Response:
        url = self._url(path_or_url)
        key = tuple(sorted(scopes))
        if self._challenge is None and data and self._same_host(url):
            self._discover()
        resp: requests.Response | None = None
        for attempt in range(2):
            sent = self._authorization(url, key)
            request_headers = dict(headers or {})
            if sent:
                request_headers["Authorization"] = sent
            resp = self._send(method, url, request_headers, data, params, stream)
            if resp.status_code != 401 or attempt == 1 or not self._same_host(url):
                break
            retry = self._on_unauthorized(resp, key, sent)
            if not retry:
                break
            resp.close()
        assert resp is not None
        if resp.status_code not in ok:
            raise self._error(resp, method, url)
        return resp

    # -- errors -----------------------------------------------------------------------------------

    def _error(self, resp: requests.Response, method: str, url: str) -> RegistryError:
        status = resp.status_code
        body = b""
        try:
            for chunk in resp.iter_content(8192):
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
        except requests.RequestException:
            pass
        finally:
            resp.close()
        code, message = "", ""
        try:
            first = json.loads(body)["errors"][0]
            code, message = str(first.get("code", "")), str(first.get("message", ""))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            text = body.decode("utf-8", "replace").strip().splitlines()
            message = text[0][:200] if text else ""
        where = f"{method} {redact(url)}"
        line = f"{where}: {status} {code or resp.reason or ''}".rstrip() + (f": {message}" if message else "")
        path = urlsplit(url).path
        cls: type[RegistryHTTPError] = RegistryHTTPError
        if status == 401:
            hint, challenge = self._login_hint(), self._challenge
            if challenge is not None and challenge.scheme == "bearer" and self._same_host(url) and self.credentials:
                realm = redact(challenge.params.get("realm", ""))
                what = f"the token {realm} issued to user {self.credentials.username!r}"
                hint = (
                    f"log in again with `llmctl registry login {self.registry}`; if that does not help, "
                    "the registry does not trust its token server"
                )
            else:
                what = self._who()
            cls, line = RegistryAuthError, f"registry {self.registry} refused {what} ({line}); {hint}"
        elif status == 403:
            cls, line = RegistryAuthError, f"registry {self.registry} denied {self._who()} ({line})"
        elif status == 404 and "/manifests/" in path:
            cls = ManifestUnknownError
        elif status == 404 and "/blobs/" in path and "/uploads/" not in path:
            cls = BlobUnknownError
        elif status in (502, 503, 504):
            return RegistryUnavailableError(line)
        return cls(line, url=redact(url), status=status, code=code)

    # -- scopes -----------------------------------------------------------------------------------

    @staticmethod
    def _pull(repo: str) -> tuple[str, ...]:
        return (f"repository:{check_repository(repo)}:pull",)

    @staticmethod
    def _push(repo: str) -> tuple[str, ...]:
        return (f"repository:{check_repository(repo)}:pull,push",)

    # -- API --------------------------------------------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/`` with the client's credentials: raises when the registry is unreachable, is not an
        OCI registry, or refuses the credentials (use it to check a login)."""
        resp = self._request("GET", "/v2/", ok=(200,))
        resp.close()

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self._request("HEAD", f"/v2/{repo}/blobs/{check_digest(digest)}", scopes=self._pull(repo), ok=(200, 404))
        resp.close()
        return resp.status_code == 200

    @contextmanager
    def open_blob(self, repo: str, digest: str, size: int | None = None) -> Iterator[VerifyingReader]:
        """A streaming reader of the blob that verifies its digest (and `size`) as it is read; the caller
        must read to the end (b"") for the check to run."""
        url = self._url(f"/v2/{repo}/blobs/{check_digest(digest)}")
        resp = self._request("GET", url, scopes=self._pull(repo), stream=True, ok=(200,))
        try:
            chunks = resp.iter_content(READ_CHUNK)
            yield VerifyingReader(_wrap_stream_errors(chunks, url), digest, size, f"GET {redact(url)}")
        finally:
            resp.close()

    def get_blob(
        self,
        repo: str,
        digest: str,
        dest: Path | None = None,
        *,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> bytes | Path:
        """The verified blob: its bytes, or `dest` (written atomically; nothing is left there on a
        mismatch or error). `size`, when given, is checked too and caps what is read."""
        with self.open_blob(repo, digest, size) as reader:
            if dest is None:
                parts = []
                while chunk := reader.read(READ_CHUNK):
                    parts.append(chunk)
                    if progress:
                        progress(reader.count)
                return b"".join(parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    while chunk := reader.read(READ_CHUNK):
                        out.write(chunk)
                        if progress:
                            progress(reader.count)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return dest

    def _try_mount(self, repo: str, digest: str, from_repo: str) -> str | None:
        """``POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<from_repo>``: None when mounted (201),
        else the upload session the registry opened instead (202)."""
        resp = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            params={"mount": check_digest(digest), "from": check_repository(from_repo)},
            scopes=self._push(repo) + self._pull(from_repo),
            ok=(201, 202),
        )
        resp.close()
        return None if resp.status_code == 201 else self._location(resp)

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount: True when mounted; False when the registry offered an upload instead
        (that session is cancelled) or the credentials may not read `from_repo`."""
        try:
            location = self._try_mount(repo, digest, from_repo)
        except RegistryAuthError as e:
            log.debug("no mount from %s: %s", from_repo, e)
            return False
        if location is None:
            return True
        self._cancel(repo, location)
        return False

    def push_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        source: BlobSource,
        *,
        mount_from: str | None = None,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Put a blob in `repo` unless it is there: "exists" (HEAD found it), "mounted" (from
        `mount_from`, same registry) or "uploaded" (monolithic up to `chunk_size`, chunked above).

        `source` is a file, the bytes, or a stream (a stream cannot be restarted when the registry
        cancels an interrupted upload). Its sha256 is computed while sending and must equal `digest`
        before the upload is committed, else `BlobVerificationError` and the session is cancelled."""
        check_digest(digest)
        if self.blob_exists(repo, digest):
            return "exists"
        location = None
        if mount_from and mount_from != repo:
            try:
                location = self._try_mount(repo, digest, mount_from)
            except RegistryAuthError as e:  # no pull access to `mount_from`: upload instead
                log.debug("no mount from %s: %s", mount_from, e)
            else:
                if location is None:
                    return "mounted"  # else 202: upload in the session the registry opened
        src = _Source(source, size, f"blob {digest} for {self.registry}/{repo}")
        try:
            return self._upload(repo, location, digest, size, src, chunk_size or DEFAULT_CHUNK_SIZE, progress, 0)
        finally:
            src.close()

    def resume_upload(
        self,
        repo: str,
        location: str,
        digest: str,
        size: int,
        source: BlobSource,
        *,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Continue an upload session (`location`, e.g. from `UploadInterruptedError`): ask the registry
        how much it has, hash that much of `source` (from its start), send the rest and commit."""
        check_digest(digest)
        src = _Source(source, size, f"blob {digest} for {self.registry}/{repo}")
        try:
            location, offset = self._upload_status(repo, location)
            return self._upload(repo, location, digest, size, src, chunk_size or DEFAULT_CHUNK_SIZE, progress, offset)
        finally:
            src.close()

    def start_upload(self, repo: str) -> str:
        """Open an upload session; its `Location` (absolute, query kept)."""
        resp = self._request("POST", f"/v2/{repo}/blobs/uploads/", scopes=self._push(repo), ok=(202,))
        resp.close()
        return self._location(resp)

    def upload_chunk(self, repo: str, location: str, offset: int, data: bytes) -> str:
        """``PATCH`` one chunk at `offset` (chunks must come in order); the next `Location`."""
        resp = self._request(
            "PATCH",
            location,
            scopes=self._push(repo),
            headers={
                "Content-Type": OCTET_STREAM,
                "Content-Range": f"{offset}-{offset + len(data) - 1}",
            },
            data=data,
            ok=(202,),
        )
        resp.close()
        return self._location(resp)

    def _location(self, resp: requests.Response) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryHTTPError(f"{resp.request.method} {redact(resp.url)}: {resp.status_code} without a Location")
        return urljoin(resp.url, location)

    def _cancel(self, repo: str, location: str) -> None:
        try:
            self._request("DELETE", location, scopes=self._push(repo), ok=(204, 404)).close()
        except RegistryError as e:  # the registry expires abandoned sessions anyway
            log.debug("cancelling upload %s failed: %s", redact(location), e)

    def _upload_status(self, repo: str, location: str) -> tuple[str, int]:
        """(current location, next offset) of an upload session; UploadSessionLost (a RegistryHTTPError
        404) when the registry no longer has it."""
        resp = self._request("GET", location, scopes=self._push(repo), ok=(204,))
        resp.close()
        match = re.fullmatch(r"(?:bytes=)?0-(\d+)", resp.headers.get("Range", "").strip())
        # distribution sends "0-0" both for an empty session and for one byte: take it as empty.
        end = int(match.group(1)) if match else -1
        offset = end + 1 if end > 0 else 0
        return (self._location(resp) if resp.headers.get("Location") else location), offset

    def _status_after_failure(
        self, repo: str, location: str, offset: int, failures: int, error: RegistryError, where: str
    ) -> tuple[str, int] | None:
        """After a failed PATCH: the session's (location, offset), or None when the registry dropped it.
        Gives up with UploadInterruptedError after MAX_RESUMES failures in a row."""
        while failures <= MAX_RESUMES:
            time.sleep(0.2 * failures)
            try:
                return self._upload_status(repo, location)
            except RegistryUnavailableError as e:
                error, failures = e, failures + 1
            except RegistryHTTPError as e:
                if e.status in (400, 404, 416):
                    return None
                raise
        raise UploadInterruptedError(
            f"{where}: upload interrupted at byte {offset} ({error}); resume it later", location=location, offset=offset
        )

    def _upload(
        self,
        repo: str,
        location: str | None,
        digest: str,
        size: int,
        src: _Source,
        chunk_size: int,
        progress: Callable[[int], None] | None,
        offset: int,
    ) -> str:
        if location is None:
            location = self.start_upload(repo)
        sha = hashlib.sha256()
        if offset:  # resuming: the registry has `offset` bytes; hash the same bytes of the source
            src.rewind()
            done = 0
            while done < offset:
                part = src.read(min(READ_CHUNK, offset - done))
                sha.update(part)
                done += len(part)
        if size <= chunk_size and offset == 0:
            data = src.read(size)
            src.check_end()
            if sha256_digest(data) != digest:
                self._cancel(repo, location)
                raise BlobVerificationError(
                    f"{src.where}: the source has digest {sha256_digest(data)}, not {digest}; not pushed"
                )
            return self._commit(repo, location, digest, data, progress, size, src)

        pending = b""  # bytes from `offset` on that the registry has not acknowledged yet
        failures = restarts = 0
        while offset < size:
            if not pending:
                pending = src.read(min(chunk_size, size - offset))
            try:
                location = self.upload_chunk(repo, location, offset, pending)
            except RegistryUnavailableError as e:
                failures += 1
                status = self._status_after_failure(repo, location, offset, failures, e, src.where)
                if status is not None and offset <= status[1] <= offset + len(pending):
                    location, got = status  # resume: the part of `pending` that arrived is done
                    sha.update(pending[: got - offset])
                    pending, offset = pending[got - offset :], got
                    continue
                # the session is gone, or holds other bytes than we sent: start it again from byte 0
                restarts += 1
                if restarts > MAX_RESUMES or not src.rewindable:
                    raise UploadInterruptedError(
                        f"{src.where}: upload interrupted at byte {offset} of {size} and the registry "
                        "cancelled the session; push it again",
                        location=location,
                        offset=0,
                    ) from None
                log.info("upload of %s: session lost after an interruption; starting it again", digest)
                src.rewind()
                location, offset, pending, sha = self.start_upload(repo), 0, b"", hashlib.sha256()
                continue
            sha.update(pending)
            offset += len(pending)
            pending = b""
            failures = 0
            if progress:
                progress(offset)
        src.check_end()
        if f"sha256:{sha.hexdigest()}" != digest:
            self._cancel(repo, location)
            raise BlobVerificationError(
                f"{src.where}: the source has digest sha256:{sha.hexdigest()}, not {digest}; upload cancelled"
            )
        return self._commit(repo, location, digest, b"", None, size, src)

    def _commit(
        self,
        repo: str,
        location: str,
        digest: str,
        data: bytes,
        progress: Callable[[int], None] | None,
        size: int,
        src: _Source,
    ) -> str:
        headers = {"Content-Type": OCTET_STREAM} if data else {}
        resp = self._request(
            "PUT",
            _with_query(location, {"digest": digest}),
            scopes=self._push(repo),
            headers=headers,
            data=data,
            ok=(201, 204),
        )
        resp.close()
        stored = resp.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise BlobVerificationError(f"{src.where}: the registry stored it as {stored}")
        if progress:
            progress(size)
        return "uploaded"

    # -- manifests ------------------------------------------------------------------------------

    def _put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> tuple[str, requests.Response]:
        if not is_digest(reference):
            check_tag(reference)
        digest = sha256_digest(data)
        if is_digest(reference) and reference != digest:
            raise BlobVerificationError(f"manifest pushed as {reference} has digest {digest}")
        resp = self._request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            scopes=self._push(repo),
            headers={"Content-Type": media_type},
            data=data,
            ok=(201, 202, 204),
        )
        resp.close()
        stored = resp.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise BlobVerificationError(
                f"PUT {redact(resp.url)}: the registry stored the manifest as {stored}, its bytes are {digest}"
            )
        return digest, resp

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Push a manifest under a tag or its digest; its digest (checked against the registry's)."""
        return self._put_manifest(repo, reference, data, media_type)[0]

    def get_manifest(
        self, repo: str, reference: str, accept: Sequence[str] = MANIFEST_MEDIA_TYPES
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest). By digest, the bytes must hash to it; by tag, to the registry's
        ``Docker-Content-Digest`` when it sends one. ManifestUnknownError when there is none."""
        if not is_digest(reference):
            check_tag(reference)
        url = self._url(f"/v2/{repo}/manifests/{reference}")
        resp = self._request(
            "GET", url, scopes=self._pull(repo), headers={"Accept": ", ".join(accept)}, stream=True, ok=(200,)
        )
        try:
            body = b""
            for chunk in resp.iter_content(READ_CHUNK):
                body += chunk
                if len(body) > MAX_MANIFEST_SIZE:
                    raise ManifestFormatError(f"GET {redact(url)}: manifest larger than {MAX_MANIFEST_SIZE} bytes")
        except requests.RequestException as e:
            raise RegistryUnavailableError(f"GET {redact(url)}: connection failed ({type(e).__name__})") from None
        finally:
            resp.close()
        digest = sha256_digest(body)
        expected = reference if is_digest(reference) else resp.headers.get("Docker-Content-Digest")
        if expected and expected != digest:
            raise BlobVerificationError(
                f"GET {redact(url)}: manifest {expected} arrived with digest {digest}; refused, nothing kept"
            )
        media_type = _media_type(resp.headers.get("Content-Type"))
        if media_type not in MANIFEST_MEDIA_TYPES:
            media_type = str(json_object(body, f"manifest {digest}").get("mediaType") or media_type)
        return body, media_type, digest

    def head_manifest(self, repo: str, reference: str, accept: Sequence[str] = MANIFEST_MEDIA_TYPES) -> str | None:
        """The digest a tag (or digest) names, None when the registry has no such manifest."""
        if not is_digest(reference):
            check_tag(reference)
        resp = self._request(
            "HEAD",
            f"/v2/{repo}/manifests/{reference}",
            scopes=self._pull(repo),
            headers={"Accept": ", ".join(accept)},
            ok=(200, 404),
        )
        resp.close()
        if resp.status_code == 404:
            return None
        digest = resp.headers.get("Docker-Content-Digest")
        if digest and is_digest(digest):
            return digest
        return self.get_manifest(repo, reference, accept)[2]

    def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete a manifest by digest (the registry must allow deletes)."""
        scopes = (f"repository:{check_repository(repo)}:delete",)
        self._request("DELETE", f"/v2/{repo}/manifests/{check_digest(digest)}", scopes=scopes, ok=(202,)).close()

    def list_tags(self, repo: str, page_size: int | None = None) -> list[str]:
        """Every tag of `repo`, following ``Link: <...>; rel="next"`` pages; [] for an unknown repository."""
        url: str | None = self._url(f"/v2/{repo}/tags/list")
        params = {"n": str(page_size)} if page_size else None
        tags: list[str] = []
        while url:
            resp = self._request("GET", url, scopes=self._pull(repo), params=params, ok=(200, 404))
            if resp.status_code == 404:
                resp.close()
                return tags
            try:
                doc = resp.json()
            except ValueError:
                raise RegistryHTTPError(f"GET {redact(url)}: the tag list is not JSON") from None
            finally:
                resp.close()
            tags += [str(t) for t in (doc.get("tags") or [])]
            following = resp.links.get("next", {}).get("url")
            url, params = (urljoin(resp.url, following) if following else None), None
        return tags

    # -- referrers ------------------------------------------------------------------------------

    def referrers(self, repo: str, digest: str, artifact_type: str | None = None) -> list[dict[str, Any]]:
        """The descriptors of manifests whose `subject` is `digest`: from ``GET /v2/<repo>/referrers/``,
        or, where the registry has no such API (404), from the fallback index at tag ``sha256-<hex>``."""
        params = {"artifactType": artifact_type} if artifact_type else None
        url = self._url(f"/v2/{repo}/referrers/{check_digest(digest)}")
        resp = self._request("GET", url, scopes=self._pull(repo), params=params, ok=(200, 404))
        filtered = False
        if resp.status_code == 200 and _media_type(resp.headers.get("Content-Type")) == OCI_INDEX:
            self._referrers_api[repo] = True
            filtered = "artifactType" in resp.headers.get("OCI-Filters-Applied", "")
            try:
                manifests = json_object(resp.content, f"referrers of {digest}").get("manifests") or []
            finally:
                resp.close()
        else:
            resp.close()
            self._referrers_api[repo] = False
            try:
                body, _, _ = self.get_manifest(repo, referrers_tag(digest), (OCI_INDEX,))
            except ManifestUnknownError:
                return []
            manifests = json_object(body, f"referrers index {referrers_tag(digest)}").get("manifests") or []
        found = [dict(m) for m in manifests if isinstance(m, dict)]
        if artifact_type and not filtered:
            found = [m for m in found if m.get("artifactType") == artifact_type]
        return found

    def supports_referrers_api(self, repo: str, digest: str) -> bool:
        """Whether the registry answers the referrers API (asked once per repository)."""
        if repo not in self._referrers_api:
            self.referrers(repo, digest)
        return self._referrers_api[repo]

    def add_referrer(self, repo: str, subject_digest: str, descriptor: Mapping[str, Any]) -> str:
        """Add `descriptor` to the fallback referrers index of `subject_digest` (fetch it, append,
        push it back; no-op when it is listed already); the index digest. Not atomic: two clients
        adding at once can lose one entry (the spec's known race)."""
        tag = referrers_tag(subject_digest)
        try:
            body, _, digest = self.get_manifest(repo, tag, (OCI_INDEX,))
            manifests = list(json_object(body, f"referrers index {tag}").get("manifests") or [])
        except ManifestUnknownError:
            body, digest, manifests = b"", "", []
        if any(isinstance(m, dict) and m.get("digest") == descriptor.get("digest") for m in manifests):
            return digest
        return self.put_manifest(repo, tag, index_manifest([*manifests, descriptor]), OCI_INDEX)

    def push_referrer(self, repo: str, manifest: bytes, media_type: str) -> str:
        """Push a manifest that has a `subject` (by digest) and make it findable: the registry indexes
        it itself when it answers with ``OCI-Subject``, else the fallback index is updated. Its digest."""
        subject = json_object(manifest, "referrer manifest").get("subject")
        if not isinstance(subject, dict) or not is_digest(str(subject.get("digest", ""))):
            raise ManifestFormatError("referrer manifest has no subject descriptor")
        digest, resp = self._put_manifest(repo, sha256_digest(manifest), manifest, media_type)
        if resp.headers.get("OCI-Subject") != subject["digest"]:
            self.add_referrer(repo, str(subject["digest"]), referrer_descriptor(manifest, media_type))
        return digest


def _wrap_stream_errors(chunks: Iterator[bytes], url: str) -> Iterator[bytes]:
    try:
        yield from chunks
    except requests.RequestException as e:
        raise RegistryUnavailableError(
            f"GET {redact(url)}: connection failed while reading ({type(e).__name__})"
        ) from None
