"""Chart repositories, as ``helm repo`` knows them: a URL (or a directory) serving ``index.yaml`` and chart archives.

The configured repositories live in ``<config>/repositories.yaml`` (``repositories: [{name, url}]``)
and each one's last fetched index in ``<cache>/repository/NAME-index.yaml``. ``index.yaml`` is Helm's
format::

    apiVersion: v1
    entries:
      mychart:
        - {name: mychart, version: 1.0.0, appVersion: ..., description: ..., keywords: [...], license: ...,
           urls: [mychart-1.0.0.tgz], digest: <sha256 hex of the archive>, created: "2024-01-01T00:00:00Z"}
    generated: "2024-01-01T00:00:00Z"

A chart from a repository is untrusted: `resolve` downloads (or copies) its archive into
``<cache>/charts/REPO/`` only when the bytes hash to the digest in the index; nothing else is kept.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

import requests
import yaml

from manager import paths
from manager.charts import (
    MAX_ARCHIVE_BYTES,
    NAME_PATTERN,
    SEMVER_PATTERN,
    ChartError,
    load_chart,
    read_meta,
    source_date_epoch,
    version_key,
    write_atomic,
)
from manager.errors import LlmctlError
from manager.fetch import redact
from manager.yamlschema import Document, parse_text

TIMEOUT = 30.0  # seconds to connect, and without a byte once connected
MAX_INDEX_BYTES = 32 * 1024 * 1024
CHUNK = 64 * 1024
BUILTIN = "builtin"  # the repository name search results give the charts llmctl ships
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "llmctl repositories.yaml",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "repositories": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "url"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": _REPO_NAME.pattern},
                    "url": {"type": "string", "minLength": 1},
                },
            },
        },
    },
}

INDEX_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "chart repository index.yaml",
    "type": "object",
    "required": ["apiVersion", "entries"],
    "properties": {
        "apiVersion": {"const": "v1"},
        "entries": {
            "type": "object",
            "propertyNames": {"pattern": NAME_PATTERN},
            "additionalProperties": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "version", "urls", "digest"],
                    "properties": {  # Helm's indexes carry more fields; they are ignored
                        "name": {"type": "string", "pattern": NAME_PATTERN},
                        "version": {"type": "string", "pattern": SEMVER_PATTERN},
                        "appVersion": {"type": "string"},
                        "description": {"type": "string"},
                        "keywords": {"type": "array", "items": {"type": "string"}},
                        "license": {"type": "string"},
                        "urls": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                        "digest": {"type": "string", "pattern": "^(sha256:)?[0-9a-f]{64}$"},
                    },
                },
            },
        },
    },
}


class RepoError(LlmctlError):
    """A chart repository that cannot be configured, fetched or read, or a chart reference that names nothing."""


@dataclass(frozen=True)
class Repo:
    name: str
    url: str  # http(s)://... or an absolute directory path


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    app_version: str
    description: str
    keywords: tuple[str, ...]
    license: str
    urls: tuple[str, ...]
    digest: str  # sha256 hex, no prefix
    created: str


@dataclass(frozen=True)
class SearchHit:
    name: str
    version: str
    app_version: str
    description: str
    repo: str  # a configured repository's name, or "builtin"

    @property
    def ref(self) -> str:
        """What `resolve` (and ``llmctl install``) takes: ``REPO/NAME``, or ``NAME`` for a builtin chart."""
        return self.name if self.repo == BUILTIN else f"{self.repo}/{self.name}"


# -- configuration ----------------------------------------------------------------------------------
def config_path() -> Path:
    return paths.config_dir() / "repositories.yaml"


def _index_cache(name: str) -> Path:
    return paths.cache_dir() / "repository" / f"{name}-index.yaml"


def list_repos() -> list[Repo]:
    """The configured repositories, in the order they were added."""
    path = config_path()
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    doc = parse_text(text, str(path), CONFIG_SCHEMA, what="repositories file", error=RepoError)
    repos = [Repo(r["name"], r["url"]) for r in doc.data.get("repositories", [])]
    seen: set[str] = set()
    for i, r in enumerate(repos):
        if r.name in seen:
            raise doc.error(("repositories", i, "name"), f"{r.name!r} is configured twice; remove one")
        seen.add(r.name)
    return repos


def _save(repos: list[Repo]) -> None:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"repositories": [{"name": r.name, "url": r.url} for r in repos]}
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False).encode())


def _get_repo(name: str) -> Repo:
    repos = list_repos()
    for r in repos:
        if r.name == name:
            return r
    known = ", ".join(r.name for r in repos) or "none"
    raise RepoError(f"no repository named {name!r} (configured: {known}); add it with `llmctl repo add NAME URL`")


def _normalize_url(url: str) -> str:
    """http(s) URLs without a trailing slash; directories (paths or file://) as absolute paths."""
    if url.startswith(("http://", "https://")):
        return url.rstrip("/")
    if url.startswith("file://"):
        path = Path(url2pathname(urlsplit(url).path))
    elif "://" in url:
        raise RepoError(f"repository URL {redact(url)!r}: only http://, https://, file:// or a directory path")
    else:
        path = Path(url).expanduser()
    return str(path.resolve())


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def add(name: str, url: str, *, force: bool = False) -> Repo:
    """Configure a repository after fetching its index once (so a typo fails now, not at install)."""
    if not _REPO_NAME.match(name) or name == BUILTIN:
        raise RepoError(
            f"repository name {name!r}: use letters, digits, '.', '_' and '-' (not {BUILTIN!r}, which names "
            "the charts llmctl ships)"
        )
    repos = list_repos()
    existing = next((r for r in repos if r.name == name), None)
    if existing is not None and not force:
        raise RepoError(f"repository {name!r} already exists ({existing.url}); pass --force to replace it")
    repo = Repo(name, _normalize_url(url))
    _fetch_and_cache(repo)
    _save([repo if r.name == name else r for r in repos] if existing else [*repos, repo])
    return repo


def remove(name: str) -> None:
    """Forget a repository and its cached index (downloaded charts stay in the cache)."""
    repos = list_repos()
    _get_repo(name)
    _save([r for r in repos if r.name != name])
    _index_cache(name).unlink(missing_ok=True)


def update(names: list[str] | None = None) -> list[str]:
    """Fetch the indexes of the named (default: all) repositories again; returns the names updated.

    Every repository is tried; if some fail, the others are still updated and a RepoError names the
    first failure.
    """
    repos = list_repos()
    targets = [_get_repo(n) for n in names] if names else repos
    done: list[str] = []
    failures: list[str] = []
    for repo in targets:
        try:
            _fetch_and_cache(repo)
            done.append(repo.name)
        except RepoError as e:
            failures.append(str(e))
    if failures:
        others = f" ({len(done)} updated: {', '.join(done)})" if done else ""
        raise RepoError(f"{failures[0]}{others}")
    return done


# -- indexes ----------------------------------------------------------------------------------------
def _http_get(url: str, limit: int) -> bytes:
    shown = redact(url)
    try:
        with requests.get(url, stream=True, timeout=(TIMEOUT, TIMEOUT)) as response:
            if response.status_code != 200:
                raise RepoError(
                    f"cannot fetch {shown}: HTTP {response.status_code} {response.reason or ''}".rstrip()
                    + "; check the repository URL"
                )
            chunks, size = [], 0
            for chunk in response.iter_content(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise RepoError(f"cannot fetch {shown}: larger than {limit} bytes; refusing it")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.Timeout:
        raise RepoError(
            f"cannot fetch {shown}: timed out after {TIMEOUT:.0f}s; check the URL and your network"
        ) from None
    except requests.ConnectionError:
        raise RepoError(f"cannot fetch {shown}: connection failed; check the URL and your network") from None
    except requests.RequestException as e:
        raise RepoError(f"cannot fetch {shown}: {type(e).__name__}: {e}") from None


def _index_url(repo: Repo) -> str:
    return f"{repo.url}/index.yaml" if _is_http(repo.url) else str(Path(repo.url) / "index.yaml")


def _fetch_index(repo: Repo) -> bytes:
    if _is_http(repo.url):
        return _http_get(_index_url(repo), MAX_INDEX_BYTES)
    directory = Path(repo.url)
    if not directory.is_dir():
        raise RepoError(f"repository {repo.name}: {directory} is not a directory")
    path = directory / "index.yaml"
    if not path.is_file():
        raise RepoError(
            f"{path}: no index.yaml, so {directory} is not a chart repository; run `llmctl repo index` there"
        )
    return path.read_bytes()


def _parse_index(raw: bytes, source: str) -> dict[str, list[IndexEntry]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RepoError(f"{source}: not UTF-8 text, so not a chart repository index") from None
    doc: Document = parse_text(text, source, INDEX_SCHEMA, what="repository index", error=RepoError)
    entries: dict[str, list[IndexEntry]] = {}
    for name, versions in doc.data["entries"].items():
        for i, e in enumerate(versions):
            if e["name"] != name:
                raise doc.error(("entries", name, i, "name"), f"{e['name']!r} is listed under {name!r}")
        entries[name] = sorted(
            (
                IndexEntry(
                    name=name,
                    version=e["version"],
                    app_version=e.get("appVersion", ""),
                    description=e.get("description", ""),
                    keywords=tuple(e.get("keywords", ())),
                    license=e.get("license", ""),
                    urls=tuple(e["urls"]),
                    digest=e["digest"].removeprefix("sha256:"),
                    created=str(e.get("created", "")),
                )
                for e in versions
            ),
            key=lambda entry: version_key(entry.version),
            reverse=True,
        )
    return entries


def _fetch_and_cache(repo: Repo) -> dict[str, list[IndexEntry]]:
    raw = _fetch_index(repo)
    entries = _parse_index(raw, redact(_index_url(repo)))
    cache = _index_cache(repo.name)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cache, raw)
    return entries


def _load_index(repo: Repo) -> dict[str, list[IndexEntry]]:
    """The cached index (fetched first if there is none yet)."""
    cache = _index_cache(repo.name)
    if not cache.is_file():
        return _fetch_and_cache(repo)
    return _parse_index(cache.read_bytes(), str(cache))


def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index(directory: Path, url: str | None = None) -> Path:
    """Write ``directory/index.yaml`` for the ``*.tgz`` charts in it and return its path.

    Each entry's URL is the file name (relative to the repository) or ``URL/file`` when `url` is given;
    ``created`` is ``$SOURCE_DATE_EPOCH`` or else the file's mtime, and ``generated`` the epoch or
    else the newest ``created``: the same files and epoch give the same bytes.
    """
    if not directory.is_dir():
        raise RepoError(f"{directory}: not a directory; `llmctl repo index` indexes a directory of chart archives")
    epoch = source_date_epoch()
    found: dict[str, dict[str, tuple[dict[str, Any], str]]] = {}
    newest = 0
    for tgz in sorted(directory.glob("*.tgz")):
        if not tgz.is_file():
            continue
        try:
            meta = load_chart(tgz).meta
        except ChartError as e:
            raise RepoError(f"cannot index {tgz}: {e}") from None
        if meta.version in found.get(meta.name, {}):
            other = found[meta.name][meta.version][1]
            raise RepoError(f"{tgz}: {meta.name} {meta.version} is also in {other}; keep one of them")
        created = epoch if epoch is not None else int(tgz.stat().st_mtime)
        newest = max(newest, created)
        entry: dict[str, Any] = {"name": meta.name, "version": meta.version}
        optional = {"appVersion": meta.app_version, "description": meta.description, "keywords": list(meta.keywords)}
        entry.update({k: v for k, v in {**optional, "license": meta.license}.items() if v})
        entry["urls"] = [f"{url.rstrip('/')}/{tgz.name}" if url else tgz.name]
        entry["digest"] = _sha256_file(tgz)
        entry["created"] = _rfc3339(created)
        found.setdefault(meta.name, {})[meta.version] = (entry, tgz.name)
    entries = {
        name: [found[name][v][0] for v in sorted(found[name], key=version_key, reverse=True)] for name in sorted(found)
    }
    data = {"apiVersion": "v1", "entries": entries, "generated": _rfc3339(epoch if epoch is not None else newest)}
    target = directory / "index.yaml"
    write_atomic(target, yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).encode())
    return target


# -- search and resolve -----------------------------------------------------------------------------
def _builtin(builtin_dir: Path | None) -> dict[str, Path]:
    if builtin_dir is None or not builtin_dir.is_dir():
        return {}
    return {p.name: p for p in sorted(builtin_dir.iterdir()) if (p / "Chart.yaml").is_file()}


def _latest(entries: list[IndexEntry]) -> IndexEntry:
    """The newest release; a pre-release only when there is nothing else (like Helm without --devel)."""
    stable = [e for e in entries if "-" not in e.version.split("+")[0]]
    return max(stable or entries, key=lambda e: version_key(e.version))


def search(keyword: str, builtin_dir: Path | None = None, *, all_versions: bool = False) -> list[SearchHit]:
    """Charts whose name (or REPO/NAME), description or keywords contain `keyword` (any case), from the
    configured repositories' cached indexes and the builtin charts; the latest version of each unless
    `all_versions`. Sorted by name, builtin first, then newest version first."""
    needle = keyword.lower()
    hits: list[tuple[IndexEntry, str]] = []

    def matches(e: IndexEntry, repo: str) -> bool:
        fields = [e.name, f"{repo}/{e.name}", e.description, *e.keywords]
        return any(needle in f.lower() for f in fields)

    for path in _builtin(builtin_dir).values():
        m = read_meta(path)
        e = IndexEntry(m.name, m.version, m.app_version, m.description, m.keywords, m.license, (), "", "")
        if matches(e, BUILTIN):
            hits.append((e, BUILTIN))
    for repo in list_repos():
        for versions in _load_index(repo).values():
            chosen = versions if all_versions else [_latest(versions)]
            hits += [(e, repo.name) for e in chosen if matches(e, repo.name)]
    hits.sort(key=lambda h: version_key(h[0].version), reverse=True)
    hits.sort(key=lambda h: (h[0].name, h[1] != BUILTIN, h[1]))
    return [SearchHit(e.name, e.version, e.app_version, e.description, repo) for e, repo in hits]


def resolve(ref: str, version: str | None = None, builtin_dir: Path | None = None) -> Path:
    """A chart reference as a local chart directory or archive:

    - a path to a chart directory or ``.tgz`` that exists;
    - ``REPO/NAME`` from a configured repository: its archive, verified against the index digest and
      cached under ``<cache>/charts/REPO/`` (a mismatch keeps nothing);
    - ``NAME``: a chart llmctl ships (``builtin_dir/NAME``).

    `version` must match exactly when given.
    """
    local = Path(ref).expanduser()
    if local.exists():
        if version is not None:
            meta = load_chart(local).meta
            if meta.version != version:
                raise RepoError(f"{ref} is version {meta.version}, not {version}; drop --version or pick that chart")
        return local
    repos = {r.name: r for r in list_repos()}
    head, _, tail = ref.partition("/")
    if tail and head in repos and "/" not in tail:
        return _from_repo(repos[head], tail, version)
    builtin = _builtin(builtin_dir)
    if not tail and ref in builtin:
        meta = read_meta(builtin[ref])
        if version is not None and meta.version != version:
            raise RepoError(f"builtin chart {ref} has version {meta.version} only, not {version}")
        return builtin[ref]
    if ref.startswith((".", "/", "~")) or ref.endswith((".tgz", ".tar.gz")):
        raise RepoError(f"{ref}: no such chart directory or archive")
    if tail and head not in repos:
        known = ", ".join(repos) or "none"
        raise RepoError(f"{ref}: no repository named {head!r} (configured: {known}) and no such path")
    candidates = list(builtin)
    for repo in repos.values():
        cache = _index_cache(repo.name)
        if cache.is_file():
            try:
                candidates += [f"{repo.name}/{n}" for n in _parse_index(cache.read_bytes(), str(cache))]
            except RepoError:
                pass
    close = difflib.get_close_matches(ref, candidates, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise RepoError(f"unknown chart {ref!r}; {hint}run `llmctl search {ref}` to find charts")


def _from_repo(repo: Repo, name: str, version: str | None) -> Path:
    entries = _load_index(repo)
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(f'{repo.name}/{c}' for c in close)}? " if close else ""
        raise RepoError(
            f"repository {repo.name} has no chart {name!r}; {hint}"
            f"run `llmctl repo update {repo.name}` if it was published recently, or `llmctl search {name}`"
        )
    versions = entries[name]
    if version is None:
        entry = _latest(versions)
    else:
        match = [e for e in versions if e.version == version]
        if not match:
            available = ", ".join(e.version for e in versions)
            raise RepoError(f"{repo.name}/{name} has no version {version}; available: {available}")
        entry = match[0]
    return _download(repo, entry)


def _chart_location(repo: Repo, url: str) -> str:
    """An absolute http(s) URL or a local path for an index entry's URL."""
    if _is_http(url):
        return url
    if url.startswith("file://"):
        return url2pathname(urlsplit(url).path)
    if _is_http(repo.url):
        return urljoin(repo.url + "/", url)
    return str(Path(repo.url) / url)


def _download(repo: Repo, entry: IndexEntry) -> Path:
    target_dir = paths.cache_dir() / "charts" / repo.name
    target = target_dir / f"{entry.name}-{entry.version}.tgz"
    if target.is_file() and _sha256_file(target) == entry.digest:
        return target
    location = _chart_location(repo, entry.urls[0])
    shown = redact(location)
    if _is_http(location):
        data = _http_get(location, MAX_ARCHIVE_BYTES)
    else:
        try:
            size = os.stat(location).st_size
            if size > MAX_ARCHIVE_BYTES:
                raise RepoError(f"{location}: {size} bytes is more than a chart archive may be")
            data = Path(location).read_bytes()
        except OSError as e:
            raise RepoError(
                f"cannot copy {location}: {e.strerror or e}; run `llmctl repo update {repo.name}`"
            ) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.digest:
        raise RepoError(
            f"{shown}: sha256 {actual} does not match the index digest {entry.digest}; nothing was kept "
            f"(the archive was changed after indexing, or the index is stale: `llmctl repo update {repo.name}`)"
        )
    target_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(target, data)
    return target
