"""Chart repositories: index, add/list/remove/update, search and resolve, with a directory repository and
an HTTP one on loopback; a tampered archive is refused and nothing of it is cached. No mocks."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from manager import chart_repos, charts, paths
from manager.chart_repos import RepoError
from tests.fileserver import FileServer, serving
from tests.netutil import free_port

FIXTURE = Path(__file__).parent / "fixtures" / "charts" / "demo"
EPOCH = 1700000000


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    return tmp_path / "home"


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serving() as s:
        yield s


def publish(repo_dir: Path, tmp_path: Path, version: str, name: str = "demo", **chart: object) -> Path:
    """Package a copy of the fixture chart as NAME-VERSION.tgz into `repo_dir` (`chart`: Chart.yaml changes)."""
    (tmp_path / "src").mkdir(exist_ok=True)
    src = Path(tempfile.mkdtemp(dir=tmp_path / "src")) / name
    shutil.copytree(FIXTURE, src)
    meta = yaml.safe_load((src / "Chart.yaml").read_text())
    meta.update(name=name, version=version, **chart)
    (src / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return charts.package(src, repo_dir)


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    publish(d, tmp_path, "0.1.0")
    publish(d, tmp_path, "0.2.0")
    publish(d, tmp_path, "0.3.0-rc.1")
    publish(d, tmp_path, "1.0.0", name="coder", description="A StarCoder2 completion model", keywords=["code"])
    chart_repos.index(d)
    return d


@pytest.fixture
def builtin(tmp_path: Path) -> Path:
    d = tmp_path / "builtin"
    shutil.copytree(FIXTURE, d / "demo")
    mini = d / "tiny"
    shutil.copytree(FIXTURE, mini)
    (mini / "Chart.yaml").write_text("apiVersion: llmctl.dev/v1\nname: tiny\nversion: 2.0.0\nkeywords: [small]\n")
    (d / "not-a-chart").mkdir()
    return d


def cached_files() -> list[Path]:
    root = paths.cache_dir() / "charts"
    return sorted(p for p in root.rglob("*") if p.is_file() and ".unpacked" not in p.parts) if root.exists() else []


# -- index ------------------------------------------------------------------------------------------
def test_index_format(repo_dir: Path) -> None:
    data = yaml.safe_load((repo_dir / "index.yaml").read_text())
    assert data["apiVersion"] == "v1"
    assert data["generated"] == "2023-11-14T22:13:20Z"
    assert list(data["entries"]) == ["coder", "demo"]
    assert [e["version"] for e in data["entries"]["demo"]] == ["0.3.0-rc.1", "0.2.0", "0.1.0"]
    entry = data["entries"]["demo"][1]
    tgz = repo_dir / "demo-0.2.0.tgz"
    assert entry == {
        "name": "demo",
        "version": "0.2.0",
        "appVersion": "1.0.0",
        "description": "A tiny demo code model for tests",
        "keywords": ["demo", "starcoder", "test"],
        "license": "apache-2.0",
        "urls": ["demo-0.2.0.tgz"],
        "digest": hashlib.sha256(tgz.read_bytes()).hexdigest(),
        "created": "2023-11-14T22:13:20Z",
    }


def test_index_is_deterministic(repo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = (repo_dir / "index.yaml").read_bytes()
    for tgz in repo_dir.glob("*.tgz"):
        os.utime(tgz, (EPOCH + 99, EPOCH + 99))
    assert chart_repos.index(repo_dir).read_bytes() == first
    # without SOURCE_DATE_EPOCH the files' mtimes decide, still the same bytes every time
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    for i, tgz in enumerate(sorted(repo_dir.glob("*.tgz"))):
        os.utime(tgz, (EPOCH + i * 3600, EPOCH + i * 3600))
    a = chart_repos.index(repo_dir).read_bytes()
    assert chart_repos.index(repo_dir).read_bytes() == a
    data = yaml.safe_load(a)
    assert data["entries"]["coder"][0]["created"] == "2023-11-14T22:13:20Z"  # coder-1.0.0.tgz sorts first
    assert data["generated"] == "2023-11-15T01:13:20Z"  # the newest of the four


def test_index_with_url_and_errors(repo_dir: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(chart_repos.index(repo_dir, "https://charts.example/stable/").read_text())
    assert data["entries"]["coder"][0]["urls"] == ["https://charts.example/stable/coder-1.0.0.tgz"]
    shutil.copy(repo_dir / "demo-0.1.0.tgz", repo_dir / "copy.tgz")
    with pytest.raises(RepoError, match="demo-0.1.0.tgz: demo 0.1.0 is also in copy.tgz; keep one of them"):
        chart_repos.index(repo_dir)
    (repo_dir / "copy.tgz").write_bytes(b"junk")
    with pytest.raises(RepoError, match=r"cannot index .*copy.tgz: .*not a gzip-compressed tar archive"):
        chart_repos.index(repo_dir)
    with pytest.raises(RepoError, match="not a directory"):
        chart_repos.index(tmp_path / "nope")


# -- a directory repository -------------------------------------------------------------------------
def test_directory_repository(repo_dir: Path, builtin: Path, home: Path) -> None:
    assert chart_repos.list_repos() == []
    chart_repos.add("local", str(repo_dir))
    assert chart_repos.list_repos() == [chart_repos.Repo("local", str(repo_dir.resolve()))]
    assert yaml.safe_load((home / "config" / "repositories.yaml").read_text()) == {
        "repositories": [{"name": "local", "url": str(repo_dir.resolve())}]
    }
    assert (home / "cache" / "repository" / "local-index.yaml").read_bytes() == (repo_dir / "index.yaml").read_bytes()

    hits = chart_repos.search("", builtin)
    assert [(h.ref, h.version) for h in hits] == [
        ("local/coder", "1.0.0"),
        ("demo", "0.1.0"),  # builtin first among equal names
        ("local/demo", "0.2.0"),  # the latest release; the rc only with all_versions
        ("tiny", "2.0.0"),
    ]
    assert [h.ref for h in chart_repos.search("STARCODER2", builtin)] == ["local/coder"]  # description
    assert [h.ref for h in chart_repos.search("small", builtin)] == ["tiny"]  # keywords
    assert [h.ref for h in chart_repos.search("local/", builtin)] == ["local/coder", "local/demo"]
    assert [h.version for h in chart_repos.search("demo", None, all_versions=True)] == ["0.3.0-rc.1", "0.2.0", "0.1.0"]
    assert chart_repos.search("nothing-like-this", builtin) == []

    path = chart_repos.resolve("local/demo", None, builtin)
    assert path == home / "cache" / "charts" / "local" / "demo-0.2.0.tgz"
    assert path.read_bytes() == (repo_dir / "demo-0.2.0.tgz").read_bytes()
    assert charts.load_chart(path).meta.version == "0.2.0"
    assert chart_repos.resolve("local/demo", "0.3.0-rc.1", builtin).name == "demo-0.3.0-rc.1.tgz"
    with pytest.raises(RepoError, match="local/demo has no version 9.9.9; available: 0.3.0-rc.1, 0.2.0, 0.1.0"):
        chart_repos.resolve("local/demo", "9.9.9", builtin)
    with pytest.raises(RepoError, match=r"repository local has no chart 'demoo'; did you mean local/demo\?"):
        chart_repos.resolve("local/demoo", None, builtin)

    chart_repos.remove("local")
    assert chart_repos.list_repos() == []
    assert not (home / "cache" / "repository" / "local-index.yaml").exists()
    with pytest.raises(RepoError, match="no repository named 'local' .configured: none."):
        chart_repos.remove("local")


def test_update_sees_new_charts(repo_dir: Path, tmp_path: Path) -> None:
    chart_repos.add("local", repo_dir.as_uri())  # file:// works as well as a path
    publish(repo_dir, tmp_path, "0.4.0")
    chart_repos.index(repo_dir)
    assert [h.version for h in chart_repos.search("demo")] == ["0.2.0"]  # the cached index
    with pytest.raises(RepoError, match="no version 0.4.0"):
        chart_repos.resolve("local/demo", "0.4.0")
    assert chart_repos.update() == ["local"]
    assert [h.version for h in chart_repos.search("demo")] == ["0.4.0"]
    assert chart_repos.resolve("local/demo").name == "demo-0.4.0.tgz"
    with pytest.raises(RepoError, match="no repository named 'other'"):
        chart_repos.update(["other"])


def test_add_errors(repo_dir: Path, tmp_path: Path) -> None:
    chart_repos.add("local", str(repo_dir))
    with pytest.raises(RepoError, match=r"repository 'local' already exists \(.*\); pass --force to replace it"):
        chart_repos.add("local", str(tmp_path))
    (tmp_path / "other").mkdir()
    with pytest.raises(RepoError, match=r"no index.yaml, so .* is not a chart repository; run `llmctl repo index`"):
        chart_repos.add("other", str(tmp_path / "other"))
    (tmp_path / "other" / "index.yaml").write_text("apiVersion: v1\nentries:\n  x:\n    - {name: x, version: 1}\n")
    with pytest.raises(RepoError, match=r"index.yaml:4: repository index field entries.x\[0\]"):
        chart_repos.add("other", str(tmp_path / "other"))
    with pytest.raises(RepoError, match="is not a directory"):
        chart_repos.add("gone", str(tmp_path / "gone"))
    with pytest.raises(RepoError, match="repository name 'builtin'"):
        chart_repos.add("builtin", str(repo_dir))
    with pytest.raises(RepoError, match="repository name 'a/b'"):
        chart_repos.add("a/b", str(repo_dir))
    with pytest.raises(RepoError, match="only http://, https://, file:// or a directory path"):
        chart_repos.add("oci", "oci://registry.example/charts")
    assert [r.name for r in chart_repos.list_repos()] == ["local"]  # nothing was added by the failures
    other = tmp_path / "repo2"
    publish(other, tmp_path, "5.0.0")
    chart_repos.index(other)
    chart_repos.add("local", str(other), force=True)
    assert chart_repos.list_repos() == [chart_repos.Repo("local", str(other.resolve()))]
    assert [h.version for h in chart_repos.search("demo")] == ["5.0.0"]


def test_malformed_repositories_file(home: Path) -> None:
    config = home / "config" / "repositories.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("repositories:\n  - name: a\n    url: /x\n  - name: a\n    url: /y\n")
    with pytest.raises(RepoError, match=rf"^{config}:4: repositories file field repositories\[1\].name: 'a' is config"):
        chart_repos.list_repos()
    config.write_text("repositories:\n  - name: a\n    uri: /x\n")
    with pytest.raises(RepoError, match=rf"^{config}:2: repositories file field repositories\[0\]: 'url' is a req"):
        chart_repos.list_repos()


# -- an HTTP repository ---------------------------------------------------------------------------
def serve_repo(server: FileServer, repo_dir: Path, prefix: str = "/charts") -> str:
    for f in sorted(repo_dir.iterdir()):
        server.add(f"{prefix}/{f.name}", f.read_bytes())
    return server.url(prefix)


def test_http_repository(server: FileServer, repo_dir: Path, home: Path) -> None:
    url = serve_repo(server, repo_dir)
    chart_repos.add("remote", url + "/")
    assert chart_repos.list_repos() == [chart_repos.Repo("remote", url)]
    assert server.requests == [("/charts/index.yaml", None)]
    assert [h.ref for h in chart_repos.search("completion")] == ["remote/coder"]
    path = chart_repos.resolve("remote/coder")
    assert path == home / "cache" / "charts" / "remote" / "coder-1.0.0.tgz"
    assert path.read_bytes() == (repo_dir / "coder-1.0.0.tgz").read_bytes()
    assert server.requests[-1] == ("/charts/coder-1.0.0.tgz", None)
    count = len(server.requests)
    assert chart_repos.resolve("remote/coder", "1.0.0") == path  # verified from the cache, not downloaded
    assert len(server.requests) == count
    text, doc = charts.render_manifest(chart := charts.load_chart(path), chart.values, charts.ReleaseInfo("r"))
    assert doc["metadata"]["name"] == "demo-model" and "kind: Model" in text

    assert chart_repos.update(["remote"]) == ["remote"]
    assert server.requests[-1] == ("/charts/index.yaml", None)


def test_http_repository_with_absolute_urls(server: FileServer, repo_dir: Path, tmp_path: Path) -> None:
    files = serve_repo(server, repo_dir, "/files")
    server.add("/idx/index.yaml", chart_repos.index(repo_dir, files).read_bytes())
    chart_repos.add("abs", server.url("/idx"))
    assert chart_repos.resolve("abs/demo", "0.1.0").read_bytes() == (repo_dir / "demo-0.1.0.tgz").read_bytes()
    assert server.requests[-1] == ("/files/demo-0.1.0.tgz", None)


def test_http_errors(server: FileServer, repo_dir: Path) -> None:
    url = serve_repo(server, repo_dir)
    with pytest.raises(RepoError, match=rf"^cannot fetch {server.url('/nothing/index.yaml')}: HTTP 404 Not Found"):
        chart_repos.add("x", server.url("/nothing"))
    server.add("/charts/index.yaml", b"", faults=["500"])
    with pytest.raises(RepoError, match=r"cannot fetch .*/charts/index.yaml: HTTP 500"):
        chart_repos.add("x", url)
    server.add("/html/index.yaml", b"<html>hello</html>")
    with pytest.raises(RepoError, match=r"index.yaml:1: repository index field \(top level\)"):
        chart_repos.add("x", server.url("/html"))
    port = free_port()
    with pytest.raises(RepoError, match=rf"cannot fetch http://127.0.0.1:{port}/index.yaml: connection failed"):
        chart_repos.add("x", f"http://127.0.0.1:{port}")
    assert chart_repos.list_repos() == []
    # a chart the index names but the server lost
    server.add("/charts/index.yaml", (repo_dir / "index.yaml").read_bytes())
    chart_repos.add("remote", url)
    del server.entries["/charts/demo-0.2.0.tgz"]
    with pytest.raises(RepoError, match=r"cannot fetch .*/charts/demo-0.2.0.tgz: HTTP 404"):
        chart_repos.resolve("remote/demo")
    assert cached_files() == []


def test_tampered_archive_is_refused(server: FileServer, repo_dir: Path, tmp_path: Path) -> None:
    url = serve_repo(server, repo_dir)
    chart_repos.add("remote", url)
    chart_repos.add("local", str(repo_dir))
    good = (repo_dir / "demo-0.2.0.tgz").read_bytes()
    expected = hashlib.sha256(good).hexdigest()
    evil_dir = tmp_path / "evil"
    evil = publish(evil_dir, tmp_path, "0.2.0", description="not what was published")
    actual = hashlib.sha256(evil.read_bytes()).hexdigest()
    server.add("/charts/demo-0.2.0.tgz", evil.read_bytes())
    shutil.copy(evil, repo_dir / "demo-0.2.0.tgz")
    for ref in ("remote/demo", "local/demo"):
        with pytest.raises(RepoError) as e:
            chart_repos.resolve(ref, "0.2.0")
        message = str(e.value)
        assert f"sha256 {actual} does not match the index digest {expected}; nothing was kept" in message
        assert "demo-0.2.0.tgz" in message
    assert cached_files() == []
    # a cached archive that no longer matches is fetched again, not used
    server.add("/charts/demo-0.2.0.tgz", good)
    path = chart_repos.resolve("remote/demo")
    path.write_bytes(evil.read_bytes())
    assert chart_repos.resolve("remote/demo").read_bytes() == good


# -- resolve: paths and builtin charts --------------------------------------------------------------
def test_resolve_paths_and_builtin(repo_dir: Path, builtin: Path, tmp_path: Path) -> None:
    assert chart_repos.resolve(str(builtin / "demo"), None, builtin) == builtin / "demo"
    tgz = repo_dir / "demo-0.1.0.tgz"
    assert chart_repos.resolve(str(tgz), "0.1.0", builtin) == tgz
    with pytest.raises(RepoError, match=r"is version 0.1.0, not 0.2.0"):
        chart_repos.resolve(str(tgz), "0.2.0", builtin)
    assert chart_repos.resolve("tiny", None, builtin) == builtin / "tiny"
    assert chart_repos.resolve("tiny", "2.0.0", builtin) == builtin / "tiny"
    with pytest.raises(RepoError, match="builtin chart tiny has version 2.0.0 only, not 1.0.0"):
        chart_repos.resolve("tiny", "1.0.0", builtin)
    with pytest.raises(RepoError, match=r"^unknown chart 'tinny'; did you mean tiny\? run `llmctl search tinny`"):
        chart_repos.resolve("tinny", None, builtin)
    with pytest.raises(RepoError, match=r"^unknown chart 'not-a-chart'; run `llmctl search not-a-chart`"):
        chart_repos.resolve("not-a-chart", None, builtin)
    with pytest.raises(RepoError, match="no such chart directory or archive"):
        chart_repos.resolve("./nowhere", None, builtin)
    with pytest.raises(RepoError, match="no repository named 'nope'"):
        chart_repos.resolve("nope/demo", None, builtin)
    chart_repos.add("local", str(repo_dir))
    with pytest.raises(RepoError, match=r"did you mean local/coder\?"):
        chart_repos.resolve("local/codr", None, builtin)
    with pytest.raises(RepoError, match=r"^unknown chart 'codr'; did you mean local/coder\?"):
        chart_repos.resolve("codr", None, builtin)
