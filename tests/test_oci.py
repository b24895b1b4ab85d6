"""registry.oci: reproducible layers and images, the OCI layout round trip, loading into Docker."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from registry.oci import Entry, Healthcheck, Image, Layer
from registry.oci.errors import BlobVerificationError, LayerEntryError
from registry.oci.layout import read_layout, write_layout

FILES = {
    "app/weights.bin": bytes(range(256)) * 4096,  # 1 MiB
    "app/run.sh": b"#!/bin/sh\necho hi\n",
    "app/conf/settings.json": b'{"a": 1}\n',
}


def _make_tree(root: Path, order: list[str], mtime: int, data: dict[str, bytes]) -> None:
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[name])
        os.utime(path, (mtime + 7, mtime))
        os.chmod(path, 0o600 if mtime % 2 else 0o666)  # disk modes must not matter


def _build(tmp: Path, order: list[str], mtime: int, data: dict[str, bytes] = FILES) -> Image:
    src = tmp / "src"
    _make_tree(src, order, mtime, data)
    entries = [
        Entry.file(name, src / name, mode=0o755 if name.endswith(".sh") else 0o644, uid=65532, gid=65532)
        for name in order
    ]
    entries.append(Entry.symlink("app/current", "weights.bin"))
    entries.append(Entry.file("etc/llmctl/version", data=b"1\n"))
    layer = Layer.from_entries(entries, tmp / "blobs")
    return (
        Image.empty()
        .with_layer(layer, created_by="llmctl test layer")
        .with_config(
            user="65532",
            env={"PATH": "/usr/bin:/bin"},
            entrypoint=["/app/run.sh"],
            working_dir="/app",
            labels={"org.opencontainers.image.title": "t", "a": "b"},
            exposed_ports=["8080/tcp"],
            healthcheck=Healthcheck(["CMD", "/app/run.sh"], interval_s=10),
        )
    )


def _digests(image: Image) -> tuple[str, str, list[str], list[str]]:
    return (
        image.digest,
        image.config_digest,
        [layer.digest for layer in image.layers],
        [layer.diff_id for layer in image.layers],
    )


def test_same_inputs_give_same_digests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    names = list(FILES)
    first = _build(tmp_path / "one", names, mtime=1_000_000_001)
    second = _build(tmp_path / "two", list(reversed(names)), mtime=1_700_000_000)
    assert _digests(first) == _digests(second)
    assert first.manifest_bytes() == second.manifest_bytes()
    assert first.layers[0].path.read_bytes() == second.layers[0].path.read_bytes()

    changed = dict(FILES)
    blob = bytearray(changed["app/weights.bin"])
    blob[123_456] ^= 1
    changed["app/weights.bin"] = bytes(blob)
    third = _build(tmp_path / "three", names, mtime=1_000_000_001, data=changed)
    assert third.digest != first.digest
    assert third.config_digest != first.config_digest
    assert third.layers[0].diff_id != first.layers[0].diff_id


def test_layer_tar_is_normalized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    image = _build(tmp_path, list(FILES), mtime=5)
    raw = image.layers[0].path.read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip MTIME field
    assert raw[3] & 0x08 == 0  # no FNAME flag
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names[:2] == ["app", "app/conf"]  # parents were added
    assert all(m.mtime == 1_700_000_000 and m.uname == "" and m.gname == "" for m in members)
    assert not any(m.pax_headers for m in members)
    run = next(m for m in members if m.name == "app/run.sh")
    assert (run.mode, run.uid, run.gid) == (0o755, 65532, 65532)
    link = next(m for m in members if m.name == "app/current")
    assert link.issym() and link.linkname == "weights.bin"
    config = json.loads(image.config_bytes())
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert config["history"][0]["created"] == "2023-11-14T22:13:20Z"
    assert config["config"]["Healthcheck"]["Interval"] == 10_000_000_000
    assert image.config_bytes() == json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def test_images_are_immutable_values(tmp_path: Path) -> None:
    base = Image.empty()
    layer = Layer.from_entries([Entry.file("a", data=b"a")], tmp_path)
    top = base.with_layer(layer)
    configured = top.with_config(user="1")
    assert base.layers == () and json.loads(base.config_bytes())["history"] == []
    assert "User" not in json.loads(top.config_bytes())["config"]
    assert len({base.digest, top.digest, configured.digest}) == 3


def test_bad_entries_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LayerEntryError, match=r"'\.\.'"):
        Entry.file("../etc/passwd", data=b"x")
    with pytest.raises(LayerEntryError, match="twice"):
        Layer.from_entries([Entry.file("a", data=b"1"), Entry.file("/a", data=b"2")], tmp_path)
    with pytest.raises(LayerEntryError, match="not a directory"):
        Layer.from_entries([Entry.file("a", data=b"1"), Entry.file("a/b", data=b"2")], tmp_path)


def test_layout_round_trip_and_corrupt_blob(tmp_path: Path) -> None:
    image = _build(tmp_path / "build", list(FILES), mtime=3)
    root = tmp_path / "layout"
    descriptor = write_layout(root, image, "llmctl/test:1")
    assert descriptor["digest"] == image.digest
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "llmctl/test:1"

    back = read_layout(root, "llmctl/test:1")
    assert _digests(back) == _digests(image)
    assert back.config_bytes() == image.config_bytes()
    # a changed image read back serializes canonically again
    assert back.with_config(user="0").digest == image.with_config(user="0").digest

    layer_blob = root / "blobs" / "sha256" / image.layers[0].digest.partition(":")[2]
    data = bytearray(layer_blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer_blob.write_bytes(bytes(data))
    with pytest.raises(BlobVerificationError, match=image.layers[0].digest):
        read_layout(root, "llmctl/test:1")

    config_blob = root / "blobs" / "sha256" / image.config_digest.partition(":")[2]
    config_blob.write_bytes(config_blob.read_bytes().replace(b"65532", b"00000"))
    with pytest.raises(BlobVerificationError, match=image.config_digest):
        read_layout(root)


# -- the real Docker engine ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def busybox_static(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's statically linked busybox binary, from a .deb cached under ~/.cache/llmctl/test-debs."""
    cache = Path.home() / ".cache" / "llmctl" / "test-debs"
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob("busybox-static_*.deb"))
    if not debs:
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                pytest.fail(f"{tool} is needed to get busybox-static from Debian")

        def download() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["apt-get", "download", "busybox-static"], cwd=cache, capture_output=True, text=True, timeout=300
            )

        result = download()
        if result.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=300)
            result = download()
        debs = sorted(cache.glob("busybox-static_*.deb"))
        if result.returncode != 0 or not debs:
            pytest.fail(f"apt-get download busybox-static failed: {result.stderr.strip()}")
    out = tmp_path_factory.mktemp("busybox")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(out)], check=True, timeout=60)
    binary = out / "bin" / "busybox"
    assert binary.is_file(), f"{debs[-1]} has no bin/busybox"
    return binary


def test_load_into_docker_and_run(tmp_path: Path, docker_client: object, busybox_static: Path) -> None:
    from registry.oci.daemon import load

    client: object = docker_client
    layer = Layer.from_entries(
        [
            Entry.file("bin/busybox", busybox_static, mode=0o755),
            Entry.file("app/hello.sh", data=b"#!/bin/busybox sh\necho hello from a script\n", mode=0o755),
            Entry.dir("tmp", mode=0o1777),
        ],
        tmp_path,
    )
    image = (
        Image.empty()
        .with_layer(layer, created_by="busybox-static from Debian + app/hello.sh")
        .with_config(
            user="65532",
            entrypoint=["/bin/busybox", "sh", "-c", "echo hello from llmctl; id -u"],
            labels={"org.opencontainers.image.title": "llmctl-oci-test"},
        )
    )
    tag = f"llmctl-oci-test:{image.config_digest.partition(':')[2][:12]}"
    try:
        image_id = load(image, tag, client)
        assert image_id == image.config_digest
        inspect = json.loads(
            subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=True).stdout
        )
        assert inspect[0]["Id"] == image.config_digest
        assert inspect[0]["RootFS"]["Layers"] == [layer.diff_id]
        run = subprocess.run(
            ["docker", "run", "--rm", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "--network", "none", "--user", "65532", tag],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == ["hello from llmctl", "65532"]
        script = subprocess.run(
            ["docker", "run", "--rm", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "--network", "none", "--user", "65532", "--entrypoint", "/app/hello.sh", tag],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert script.returncode == 0, script.stderr
        assert script.stdout == "hello from a script\n"
    finally:
        subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True, timeout=60)
