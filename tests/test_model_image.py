"""A per-model image end to end on the real Docker engine: reproducible from scratch, served from a
hardened container, and refused at start when the weights inside are not the pinned bytes."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from manager import base_image
from manager.errors import ImageBuildError
from manager.model_image import ModelImageSpec, assemble, image_from_layers, runtime_entries
from registry.oci import Entry, Layer
from runtime.testing.make_model import make_model
from tests.netutil import free_port, wait_for_health

CACHE = Path.home() / ".cache" / "llmctl"
HARDENING = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_rootfs() -> Path:
    root, _ = base_image.cached_rootfs(CACHE / "base-rootfs", deb_cache=CACHE / "debs", allow_newer=True)
    return root


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelImageSpec:
    weights = make_model(tmp_path_factory.mktemp("w") / "w.gguf", preset="tiny", wtype="q8_0", seed=4)
    digest = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    return ModelImageSpec(name="demo-q8_0", version="1.0.0", weights=weights, weights_sha256=digest)


def test_same_inputs_give_the_same_image_digest(spec: ModelImageSpec, base_rootfs: Path, tmp_path: Path) -> None:
    first = assemble(spec, base_rootfs, tmp_path / "a")
    second = assemble(spec, base_rootfs, tmp_path / "b")  # an empty blob directory: built from scratch
    assert first.digest == second.digest and first.config_digest == second.config_digest
    # weights below the runtime: a runtime change leaves the base and weights layers as they are
    assert [layer.diff_id for layer in first.layers][:2] == [layer.diff_id for layer in second.layers][:2]
    labels = first.config_json()["config"]["Labels"]
    assert labels["dev.llmctl.model.weights.digest"] == spec.weights_sha256


def test_weights_that_do_not_match_the_pin_build_nothing(
    spec: ModelImageSpec, base_rootfs: Path, tmp_path: Path
) -> None:
    bad = ModelImageSpec(**{**spec.__dict__, "weights_sha256": "sha256:" + "0" * 64})
    with pytest.raises(ImageBuildError, match="refusing to build"):
        assemble(bad, base_rootfs, tmp_path / "blobs")
    assert not (tmp_path / "blobs").exists()  # not a single layer was written


def test_image_serves_from_a_hardened_container(
    spec: ModelImageSpec, base_rootfs: Path, tmp_path: Path, docker_client: object
) -> None:
    from registry.oci.daemon import load

    image = assemble(spec, base_rootfs, tmp_path / "blobs")
    tag = f"llmctl-test/model-image:{image.config_digest[7:19]}"
    load(image, tag)
    port = free_port()
    name = f"llmctl-test-{port}"
    try:
        subprocess.run(
            ["docker", "run", "-d", "--name", name, *HARDENING, "-p", f"127.0.0.1:{port}:8080", tag],
            check=True,
            capture_output=True,
            timeout=60,
        )
        status = wait_for_health(f"http://127.0.0.1:{port}", 90)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
        assert status == 200, logs
        assert f"weights match {spec.weights_sha256}" in logs  # checked before serving
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"prompt": "def add(a, b):\n    return ", "suffix": "\n", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        user = subprocess.run(
            ["docker", "inspect", "-f", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}", name],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert user == ["65532:65532", "true"]
        stop = subprocess.run(["docker", "stop", "-t", "30", name], capture_output=True, timeout=60)
        assert stop.returncode == 0
        code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True, text=True)
        assert code.stdout.strip() == "0"  # SIGTERM: drained and exited cleanly
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def test_tampered_weights_inside_the_image_are_refused_at_start(
    spec: ModelImageSpec, base_rootfs: Path, tmp_path: Path, docker_client: object
) -> None:
    """An image whose weights layer was swapped after the build (same pinned digest in its
    configuration, one flipped byte in the file) never serves: the container exits 1."""
    from registry.oci.daemon import load

    tampered = tmp_path / "tampered.gguf"
    shutil.copyfile(spec.weights, tampered)
    data = bytearray(tampered.read_bytes())
    data[-10] ^= 0x01
    tampered.write_bytes(bytes(data))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    base = Layer.from_entries(base_image.rootfs_entries(base_rootfs), blobs)
    weights = Layer.from_entries([Entry.file(f"models/{spec.file_name}", tampered, mode=0o444)], blobs)
    image = image_from_layers(spec, base, weights, Layer.from_entries(runtime_entries(), blobs))
    tag = f"llmctl-test/tampered:{image.config_digest[7:19]}"
    load(image, tag)
    try:
        run = subprocess.run(
            ["docker", "run", "--rm", *HARDENING, "--network", "none", tag], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 1
        assert "weights digest mismatch" in run.stderr and "refusing to serve" in run.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
