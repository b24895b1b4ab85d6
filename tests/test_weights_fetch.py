"""Fetching weights into the content-addressed cache, over real HTTP on loopback, with faults."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager import cli
from manager.blobstore import BlobStore, parse_digest
from manager.errors import DigestFormatError, DigestMismatchError, FetchError
from manager.fetch import fetch, redact
from tests.fileserver import FileServer, serving

SIZE = 600_000
FAST = {"progress": False, "retries": 3, "timeout": 0.5, "backoff": 0.01}


def _data(seed: int = 0, size: int = SIZE) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serving(stall_seconds=3.0) as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "cache")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_fetch_over_http_stores_the_blob_under_its_digest(server: FileServer, store: BlobStore) -> None:
    data = _data()
    url = server.add("/m.gguf", data)
    path = fetch(url, _digest(data), store, **FAST)
    assert path == store.root / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data
    assert not store.partial_path(_digest(data)).exists()
    assert store.metadata(_digest(data))["source"] == url
    assert [b.digest for b in store.list()] == [_digest(data)]


def test_interrupted_download_resumes_with_a_range_request(server: FileServer, store: BlobStore) -> None:
    data = _data(1)
    url = server.add("/m.gguf", data, faults=["truncate"])
    assert fetch(url, _digest(data), store, **FAST).read_bytes() == data
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    assert server.requests[1][1] is not None and server.requests[1][1].startswith("bytes=")
    assert int(server.requests[1][1].removeprefix("bytes=").rstrip("-")) > 0
    assert server.bytes_sent < 2 * len(data)


def test_resume_from_a_partial_left_by_an_earlier_run(server: FileServer, store: BlobStore) -> None:
    data = _data(2)
    digest = _digest(data)
    store.blob_dir.mkdir(parents=True)
    store.partial_path(digest).write_bytes(data[:250_000])
    url = server.add("/m.gguf", data)
    assert fetch(url, digest, store, **FAST).read_bytes() == data
    assert server.requests == [("/m.gguf", "bytes=250000-")]
    assert server.bytes_sent == len(data) - 250_000


def test_a_server_that_ignores_range_restarts_from_zero(server: FileServer, store: BlobStore) -> None:
    data = _data(3)
    digest = _digest(data)
    store.blob_dir.mkdir(parents=True)
    store.partial_path(digest).write_bytes(data[:100_000])
    url = server.add("/m.gguf", data, ignore_range=True)
    assert fetch(url, digest, store, **FAST).read_bytes() == data
    assert server.requests[0][1] == "bytes=100000-"


def test_a_complete_partial_is_committed_after_416(server: FileServer, store: BlobStore) -> None:
    data = _data(4)
    digest = _digest(data)
    store.blob_dir.mkdir(parents=True)
    store.partial_path(digest).write_bytes(data)
    url = server.add("/m.gguf", data)
    assert fetch(url, digest, store, **FAST).read_bytes() == data
    assert server.bytes_sent == 0


def test_digest_mismatch_deletes_the_partial_and_names_both_digests(server: FileServer, store: BlobStore) -> None:
    data, wrong = _data(5), _data(6)
    expected = _digest(data)
    url = server.add("/m.gguf", wrong)
    with pytest.raises(DigestMismatchError) as info:
        fetch(url, expected, store, **FAST)
    message = str(info.value)
    assert expected in message and _digest(wrong) in message and url in message
    assert not store.partial_path(expected).exists()
    assert not store.has(expected)


def test_server_errors_are_retried_until_success(server: FileServer, store: BlobStore) -> None:
    data = _data(7)
    url = server.add("/m.gguf", data, faults=["500", "503", "429"])
    assert fetch(url, _digest(data), store, **FAST).read_bytes() == data
    assert len(server.requests) == 4


def test_too_many_server_errors_give_up_with_the_url(server: FileServer, store: BlobStore) -> None:
    data = _data(8)
    url = server.add("/m.gguf", data, faults=["500"] * 10)
    with pytest.raises(FetchError, match="HTTP 500") as info:
        fetch(url, _digest(data), store, **{**FAST, "retries": 2})
    assert url in str(info.value)
    assert len(server.requests) == 3


def test_a_stalled_connection_is_retried_and_resumed(server: FileServer, store: BlobStore) -> None:
    data = _data(9)
    url = server.add("/m.gguf", data, faults=["stall"])
    started = time.monotonic()
    assert fetch(url, _digest(data), store, **FAST).read_bytes() == data
    assert time.monotonic() - started < 2.5  # the read timeout fired; the 3 s stall was not waited out
    assert len(server.requests) == 2
    assert server.requests[1][1] is not None


def test_a_404_fails_fast_with_the_url(server: FileServer, store: BlobStore) -> None:
    url = server.url("/missing.gguf")
    with pytest.raises(FetchError, match="HTTP 404") as info:
        fetch(url, _digest(b"x"), store, **FAST)
    assert url in str(info.value)
    assert len(server.requests) == 1


def test_credentials_never_appear_in_messages_or_records(server: FileServer, store: BlobStore) -> None:
    data = _data(10)
    server.add("/m.gguf", data)
    url = server.base_url.replace("http://", "http://alice:hunter2@") + "/m.gguf?token=s3cret&x=1"
    fetch(url, _digest(data), store, **FAST)
    assert "hunter2" not in json.dumps(store.metadata(_digest(data)))
    assert "s3cret" not in json.dumps(store.metadata(_digest(data)))
    with pytest.raises(FetchError) as info:
        fetch(url.replace("/m.gguf", "/nope"), _digest(b"y"), store, **FAST)
    assert "hunter2" not in str(info.value) and "alice" not in str(info.value)
    assert redact("https://u:p@host:8443/a?sig=zz") == "https://host:8443/a?sig=REDACTED"


def test_file_url_and_local_path(tmp_path: Path, store: BlobStore) -> None:
    data = _data(11)
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    assert fetch(src.as_uri(), _digest(data), store, progress=False).read_bytes() == data
    store.remove(_digest(data))
    assert fetch(str(src), _digest(data), store, progress=False).read_bytes() == data
    with pytest.raises(FetchError, match="no such file"):
        fetch(str(tmp_path / "absent.gguf"), _digest(b"z"), store, progress=False)
    with pytest.raises(FetchError, match="unsupported source"):
        fetch("ftp://example.org/x", _digest(b"z"), store, progress=False)


def test_cached_blob_is_reverified_and_a_corrupt_one_refetched(server: FileServer, store: BlobStore) -> None:
    data = _data(12)
    digest = _digest(data)
    url = server.add("/m.gguf", data)
    path = fetch(url, digest, store, **FAST)
    fetch(url, digest, store, **FAST)
    assert len(server.requests) == 1  # intact: reused without a request

    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert fetch(url, digest, store, **FAST).read_bytes() == data
    assert len(server.requests) == 2


def test_digest_format_is_validated() -> None:
    hexpart = "ab" * 32
    assert parse_digest(hexpart.upper()) == f"sha256:{hexpart}"
    for bad in ("sha256:abc", "md5:" + hexpart, "sha256:" + "g" * 64):
        with pytest.raises(DigestFormatError, match="64 hex digits"):
            parse_digest(bad)


# -- the CLI -------------------------------------------------------------------------------------
def _cli_fetch(tmp_path: Path, data: bytes, name: str, *extra: str) -> Path:
    src = tmp_path / name
    src.write_bytes(data)
    assert cli.main(["cache", "fetch", str(src), "--sha256", _digest(data), "--no-progress", *extra]) == 0
    return BlobStore(tmp_path / "home" / "cache").path(_digest(data))


def test_cli_fetch_ls_json_and_table(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _data(20, 1000), _data(21, 2000)
    path_a = _cli_fetch(tmp_path, a, "a.gguf", "--pin", "model-a")
    _cli_fetch(tmp_path, b, "b.gguf")
    assert capsys.readouterr().out.splitlines()[0] == str(path_a)

    assert cli.main(["cache", "ls", "-o", "json"]) == 0
    listed = {e["digest"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed[_digest(a)]["pins"] == ["model-a"] and listed[_digest(a)]["size"] == len(a)
    assert listed[_digest(b)]["pins"] == []
    assert listed[_digest(a)]["source"].endswith("a.gguf")

    assert cli.main(["cache", "ls"]) == 0
    table = capsys.readouterr().out
    assert "DIGEST" in table and _digest(a) in table and "model-a" in table


def test_cli_verify_detects_a_flipped_byte(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = _data(22, 3000), _data(23, 3000)
    _cli_fetch(tmp_path, good, "good.gguf")
    bad_path = _cli_fetch(tmp_path, bad, "bad.gguf")
    assert cli.main(["cache", "verify", _digest(good)]) == 0
    capsys.readouterr()

    raw = bytearray(bad_path.read_bytes())
    raw[-1] ^= 0x01
    bad_path.write_bytes(bytes(raw))
    assert cli.main(["cache", "verify"]) == 1
    captured = capsys.readouterr()
    assert f"ok  {_digest(good)}" in captured.out
    assert _digest(bad) in captured.err and "corrupt" in captured.err
    assert not bad_path.exists()

    assert cli.main(["cache", "verify", _digest(bad)]) == 1  # gone now: named, one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("llmctl: error: no blob") and "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_gc_keeps_pinned_and_removes_the_rest(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kept, dropped = _data(24, 1000), _data(25, 1000)
    kept_path = _cli_fetch(tmp_path, kept, "kept.gguf", "--pin", "keep-me")
    dropped_path = _cli_fetch(tmp_path, dropped, "dropped.gguf")
    store = BlobStore(home / "cache")
    partial = store.partial_path(_digest(_data(26, 10)))
    partial.write_bytes(b"half a download")

    assert cli.main(["cache", "gc", "--dry-run"]) == 0
    assert str(dropped_path) in capsys.readouterr().out
    assert dropped_path.exists() and partial.exists()

    assert cli.main(["cache", "gc"]) == 0
    out = capsys.readouterr().out
    assert str(partial) in out and str(dropped_path) in out
    assert kept_path.exists() and store.metadata(_digest(kept))
    assert not dropped_path.exists() and not partial.exists()
    assert not store.sidecar_path(_digest(dropped)).exists()
    assert [b.digest for b in store.list()] == [_digest(kept)]


def test_cli_errors_are_one_line(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "x.gguf"
    src.write_bytes(b"some bytes")
    assert cli.main(["cache", "fetch", str(src), "--sha256", "sha256:" + "0" * 64, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmctl: error: digest mismatch") and len(err.splitlines()) == 1
    assert "sha256:" + "0" * 64 in err and _digest(b"some bytes") in err

    assert cli.main(["cache", "fetch", str(src), "--sha256", "nope"]) == 1
    assert "64 hex digits" in capsys.readouterr().err
    with pytest.raises(DigestFormatError):
        cli.main(["--debug", "cache", "fetch", str(src), "--sha256", "nope"])
