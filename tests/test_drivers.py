"""Instance drivers on real processes and the real Docker engine: start, health, completions, crash
restarts, refused weights, taken ports, hardening, labels, stop and removal."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from manager import base_image
from manager.drivers import (
    DriverError,
    DriverUnavailableError,
    Instance,
    InstanceSpec,
    PortInUseError,
    get_driver,
)
from manager.drivers.docker import DockerDriver
from manager.drivers.process import ProcessDriver
from manager.drivers.procfs import alive, start_time, write_json_atomic
from runtime.testing.make_model import make_model
from tests.netutil import free_port
from tests.polling import until

CACHE = Path.home() / ".cache" / "llmctl"
WRONG_DIGEST = "sha256:" + "0" * 64
COMPLETION = {"prompt": "def add(a, b):\n    return ", "max_tokens": 4, "temperature": 0}


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("w") / "demo.gguf", preset="tiny", wtype="q8_0", seed=11)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMCTL_VERIFY_DIR", str(tmp_path / "verified"))  # the servers' hash records
    monkeypatch.delenv("LLMCTL_API_KEY", raising=False)
    return tmp_path / "home"


@pytest.fixture
def process_driver(home: Path) -> Iterator[ProcessDriver]:
    driver = get_driver("process")
    assert isinstance(driver, ProcessDriver)
    assert driver.state_dir == home / "data" / "instances"
    yield driver
    for instance in driver.list():  # whatever a failed test left running
        driver.stop(instance, timeout=5)
        driver.remove(instance)


def _process_spec(weights: Path, release: str, **kw: Any) -> InstanceSpec:
    return InstanceSpec(
        release=release,
        revision=kw.pop("revision", 1),
        image="",
        image_id="",
        weights=weights,
        weights_in_image="",
        weights_sha256=kw.pop("weights_sha256", _digest(weights)),
        **kw,
    )


def _state(driver: ProcessDriver, instance: Instance) -> dict[str, Any]:
    data = json.loads(driver.state_path(instance.release, instance.revision).read_text())
    assert isinstance(data, dict)
    return data


# --- the process driver ------------------------------------------------------------------------


def test_process_instance_serves_lists_stops_and_is_removed(process_driver: ProcessDriver, weights: Path) -> None:
    key = "s3cret-key-for-the-test"
    spec = _process_spec(weights, "demo", revision=3, parallel=2, ctx=256, repack=False, api_key=key)
    assert key not in repr(spec)
    instance = process_driver.start(spec)
    assert (instance.release, instance.revision, instance.driver) == ("demo", 3, "process")
    assert instance.endpoint.startswith("http://127.0.0.1:") and instance.model_digest == spec.weights_sha256
    assert process_driver.wait_healthy(instance, 60), process_driver.logs(instance)

    r = httpx.post(f"{instance.endpoint}/v1/completions", json=COMPLETION, timeout=60)
    assert r.status_code == 401  # the key reached the server
    r = httpx.post(
        f"{instance.endpoint}/v1/completions", json=COMPLETION, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    props = httpx.get(f"{instance.endpoint}/props", headers={"Authorization": f"Bearer {key}"}).json()
    assert props["n_ctx"] == 256 and props["total_slots"] == 2

    [listed] = process_driver.list()
    assert (listed.id, listed.state, listed.health) == (instance.id, "running", "healthy")
    assert process_driver.list(release="other") == []
    assert process_driver.health(instance) == "healthy"
    state = _state(process_driver, instance)
    assert state["argv"][-5:] == ["--ctx", "256", "--parallel", "2", "--no-repack"]  # the server took it
    child = state["child"]["pid"]
    for where in (
        json.dumps(state),
        Path(f"/proc/{child}/cmdline").read_bytes().decode(),
        process_driver.logs(instance),
    ):
        assert key not in where  # the key travels in the environment only

    with pytest.raises(DriverError, match="already running"):
        process_driver.start(spec)
    with pytest.raises(DriverError, match="stop it first"):
        process_driver.remove(instance)

    process_driver.stop(instance, timeout=30)
    assert not alive(child, state["child"]["start_time"])
    final = _state(process_driver, instance)
    assert final["status"] == "exited" and final["exit_code"] == 0  # SIGTERM: drained, exited cleanly
    [listed] = process_driver.list(release="demo")
    assert (listed.state, listed.health) == ("exited", "unknown")
    assert "server stopped with status 0" in process_driver.logs(instance)

    process_driver.remove(instance)
    assert process_driver.list() == []
    process_driver.stop(instance)  # both idempotent: cleanup after a partial failure just works
    process_driver.remove(instance)
    assert not process_driver.state_path("demo", 3).exists() and not process_driver.log_path("demo", 3).exists()


def test_server_args_add_no_repack_only_when_repacking_is_off() -> None:
    spec = InstanceSpec(
        release="r", revision=1, image="", image_id="", weights=None, weights_in_image="",
        weights_sha256=WRONG_DIGEST, threads=2, parallel=3,
    )  # fmt: skip
    assert spec.server_args() == ["--threads", "2", "--parallel", "3"]  # the default: the server repacks
    assert replace(spec, repack=False).server_args() == ["--threads", "2", "--parallel", "3", "--no-repack"]
    assert replace(spec, threads=None, parallel=None, repack=False).server_args() == ["--no-repack"]


def test_a_crashed_server_is_restarted(process_driver: ProcessDriver, weights: Path) -> None:
    instance = process_driver.start(_process_spec(weights, "crash"))
    assert process_driver.wait_healthy(instance, 60), process_driver.logs(instance)
    first = _state(process_driver, instance)["child"]
    os.kill(first["pid"], signal.SIGKILL)

    def restarted() -> bool:
        child = _state(process_driver, instance).get("child")
        return child is not None and child["pid"] != first["pid"]

    assert until(restarted, 30, every=0.1), process_driver.logs(instance)
    assert process_driver.wait_healthy(instance, 60), process_driver.logs(instance)
    state = _state(process_driver, instance)
    assert state["restarts"] == 1 and state["last_exit_code"] == 137
    assert "server exited with status 137; restarting" in process_driver.logs(instance)
    r = httpx.post(f"{instance.endpoint}/v1/completions", json=COMPLETION, timeout=60)
    assert r.status_code == 200
    process_driver.stop(instance)
    assert process_driver.list()[0].state == "exited"


def test_a_killed_supervisor_takes_its_server_along(process_driver: ProcessDriver, weights: Path) -> None:
    instance = process_driver.start(_process_spec(weights, "orphan"))
    assert process_driver.wait_healthy(instance, 60), process_driver.logs(instance)
    state = _state(process_driver, instance)
    os.kill(state["supervisor"]["pid"], signal.SIGKILL)
    assert until(lambda: process_driver.list()[0].state == "exited", 10, every=0.1)
    child = state["child"]
    assert until(lambda: not alive(child["pid"], child["start_time"]), 15, every=0.1)  # PR_SET_PDEATHSIG


def test_weights_that_do_not_match_the_digest_are_refused_and_not_restarted(
    process_driver: ProcessDriver, weights: Path
) -> None:
    instance = process_driver.start(_process_spec(weights, "tampered", weights_sha256=WRONG_DIGEST))
    began = time.monotonic()
    assert not process_driver.wait_healthy(instance, 60)
    assert time.monotonic() - began < 30  # gave up as soon as the server exited, not at the timeout
    [listed] = process_driver.list()
    assert (listed.state, listed.health) == ("exited", "unknown")
    logs = process_driver.logs(instance)
    assert "weights digest mismatch" in logs and "refusing to serve" in logs, logs
    assert logs.count("server started") == 1 and "not restarting" in logs
    assert _state(process_driver, instance)["exit_code"] == 1


def test_a_port_in_use_is_refused_before_anything_starts(process_driver: ProcessDriver, weights: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} "):
            process_driver.start(_process_spec(weights, "busy", port=port))
    assert process_driver.list() == [] and not process_driver.state_path("busy", 1).exists()


@pytest.mark.slow
def test_the_supervisor_gives_up_after_five_restarts_in_a_minute(process_driver: ProcessDriver) -> None:
    """The supervisor on its own, with a "server" that always crashes (exit 3)."""
    state_dir = process_driver.state_dir
    state_dir.mkdir(parents=True)
    path = state_dir / "crashy-1.json"
    write_json_atomic(path, {"argv": [sys.executable, "-c", "import sys; sys.exit(3)"]})
    run = subprocess.run(
        [sys.executable, "-m", "manager.drivers.supervise", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 3, run.stderr
    assert run.stderr.count("server started") == 6  # the first run and 5 restarts
    assert "5 restarts in 60 s, giving up" in run.stderr
    state = json.loads(path.read_text())
    assert state["status"] == "exited" and state["exit_code"] == 3


def test_pid_start_times_tell_a_reused_pid_apart() -> None:
    me = os.getpid()
    assert alive(me, start_time(me))
    assert not alive(me, (start_time(me) or 0) + 1)
    assert not alive(None, None) and start_time(2**22 + 1) is None


# --- driver selection --------------------------------------------------------------------------


def test_an_unreachable_engine_is_reported_or_falls_back_to_processes(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    with pytest.raises(DriverUnavailableError) as err:
        get_driver("docker")
    message = str(err.value)
    assert message.startswith("the Docker engine is not reachable (") and "use --driver process" in message
    assert "\n" not in message
    assert isinstance(get_driver(None), ProcessDriver)
    with pytest.raises(DriverError, match="unknown driver 'k8s'"):
        get_driver("k8s")


def test_specs_no_driver_can_run_are_refused(process_driver: ProcessDriver, weights: Path) -> None:
    for bad, match in (
        ({"release": "Bad_Name"}, "release name"),
        ({"release": "../x"}, "release name"),
        ({"revision": 0}, "revision"),
        ({"weights_sha256": "md5:abc"}, "weights digest"),
        ({"host": "localhost"}, "not an IP address"),
        ({"weights": weights.parent / "missing.gguf"}, "does not exist"),
    ):
        with pytest.raises(DriverError, match=match):
            process_driver.start(replace(_process_spec(weights, "ok"), **bad))
    assert process_driver.list() == []


# --- the docker driver -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_rootfs() -> Path:
    root, _ = base_image.cached_rootfs(CACHE / "base-rootfs", deb_cache=CACHE / "debs", allow_newer=True)
    return root


@pytest.fixture(scope="module")
def images(
    docker_client: Any, base_rootfs: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[str, str]]]:
    """Two images of the test model, loaded into the engine: {"baked"|"mounted": (tag, image ID)}."""
    from manager.model_image import ModelImageSpec, assemble
    from registry.oci.daemon import load

    made: dict[str, tuple[str, str]] = {}
    try:
        for kind in ("baked", "mounted"):
            spec = ModelImageSpec(
                name="demo-q8_0",
                version="1.0.0",
                weights=weights,
                weights_sha256=_digest(weights),
                mounted=kind == "mounted",
            )
            image = assemble(spec, base_rootfs, tmp_path_factory.mktemp(f"blobs-{kind}"))
            tag = f"llmctl-test-drivers:{kind}-{image.config_digest[7:19]}"
            made[kind] = (tag, load(image, tag, docker_client))
        yield made
    finally:
        for tag, _ in made.values():
            docker_client.images.remove(tag, force=True)


@pytest.fixture
def docker_driver(docker_client: Any) -> Iterator[DockerDriver]:
    driver = get_driver("docker")
    assert isinstance(driver, DockerDriver)
    yield driver
    for container in docker_client.containers.list(all=True, filters={"name": "llmctl-test-"}):
        container.remove(force=True)


def _docker_spec(images: dict[str, tuple[str, str]], kind: str, release: str, weights: Path, **kw: Any) -> InstanceSpec:
    tag, image_id = images[kind]
    return InstanceSpec(
        release=release,
        revision=kw.pop("revision", 1),
        image=tag,
        image_id=image_id,
        weights=weights if kind == "mounted" else None,
        weights_in_image="/models/demo-q8_0.gguf",
        weights_sha256=_digest(weights),
        **kw,
    )


@pytest.mark.slow
def test_docker_instances_run_hardened_labeled_and_stop_cleanly(
    docker_driver: DockerDriver, docker_client: Any, images: dict[str, tuple[str, str]], weights: Path
) -> None:
    key = "docker-test-key"
    baked_spec = _docker_spec(
        images, "baked", "test-baked", weights, parallel=2, ctx=256, cpus=1.5, memory="1g", api_key=key
    )
    baked = docker_driver.start(baked_spec)
    mounted = docker_driver.start(_docker_spec(images, "mounted", "test-mounted", weights, revision=2))
    for instance in (baked, mounted):
        assert docker_driver.wait_healthy(instance, 120), docker_driver.logs(instance)
        assert instance.driver == "docker" and instance.state == "running"
        assert instance.model_digest == _digest(weights)
    assert httpx.post(f"{baked.endpoint}/v1/completions", json=COMPLETION, timeout=60).status_code == 401
    r = httpx.post(
        f"{baked.endpoint}/v1/completions", json=COMPLETION, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    r = httpx.post(f"{mounted.endpoint}/v1/completions", json=COMPLETION, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert f"weights match {_digest(weights)}" in docker_driver.logs(mounted, tail=200)

    for instance, name in ((baked, "llmctl-test-baked-1"), (mounted, "llmctl-test-mounted-2")):
        attrs = docker_client.api.inspect_container(instance.id)
        host = attrs["HostConfig"]
        assert attrs["Name"] == f"/{name}"
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"] == ["no-new-privileges"] and attrs["Config"]["User"] == "65532:65532"
        assert host["Tmpfs"] == {"/tmp": "rw,noexec,nosuid,size=64m"} and host["PidsLimit"] > 0
        assert host["Init"] is True and host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
        port = int(instance.endpoint.rsplit(":", 1)[1])
        assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        assert attrs["NetworkSettings"]["Ports"]["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
        labels = attrs["Config"]["Labels"]
        assert labels["dev.llmctl.managed"] == "true" and labels["dev.llmctl.model.digest"] == _digest(weights)
        assert (labels["dev.llmctl.release"], labels["dev.llmctl.revision"]) == (
            instance.release,
            str(instance.revision),
        )
        assert "--sha256" in attrs["Args"] and "0.0.0.0" in attrs["Args"]  # the image's command is kept
    baked_attrs = docker_client.api.inspect_container(baked.id)
    assert baked_attrs["Args"][-4:] == ["--ctx", "256", "--parallel", "2"]
    assert baked_attrs["HostConfig"]["NanoCpus"] == 1_500_000_000
    assert baked_attrs["HostConfig"]["Memory"] == 1 << 30 and baked_attrs["HostConfig"]["MemorySwap"] == 1 << 30
    assert key not in " ".join(baked_attrs["Args"]) and key not in docker_driver.logs(baked, tail=500)
    assert baked_attrs["Mounts"] == []
    [mount] = docker_client.api.inspect_container(mounted.id)["Mounts"]
    assert (mount["Destination"], mount["RW"], mount["Source"]) == ("/models/demo-q8_0.gguf", False, str(weights))

    [listed] = docker_driver.list(release="test-baked")
    assert (listed.id, listed.state, listed.health, listed.endpoint) == (baked.id, "running", "healthy", baked.endpoint)
    assert {i.id for i in docker_driver.list()} >= {baked.id, mounted.id}
    assert docker_driver.health(mounted) == "healthy"

    with pytest.raises(DriverError, match="already running"):
        docker_driver.start(baked_spec)
    with pytest.raises(DriverError, match="stop it first"):
        docker_driver.remove(baked)

    for instance in (baked, mounted):
        docker_driver.stop(instance, timeout=30)
        state = docker_client.api.inspect_container(instance.id)["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0)  # SIGTERM through init: drained
    [listed] = docker_driver.list(release="test-mounted")
    assert (listed.state, listed.health) == ("exited", "unknown")

    # a stopped container of the same name (say, after a crash) is replaced by a new start
    again = docker_driver.start(baked_spec)
    assert again.id != baked.id and docker_driver.wait_healthy(again, 120)
    docker_driver.stop(again, timeout=30)
    for instance in (again, mounted):
        docker_driver.remove(instance)
    assert docker_driver.list(release="test-baked") == [] and docker_driver.list(release="test-mounted") == []
    docker_driver.stop(mounted)
    docker_driver.remove(mounted)
    assert docker_driver.health(mounted) == "unknown" and docker_driver.logs(mounted) == ""


@pytest.mark.slow
def test_docker_refuses_an_image_that_is_not_the_verified_one(
    docker_driver: DockerDriver, docker_client: Any, images: dict[str, tuple[str, str]], weights: Path
) -> None:
    spec = replace(_docker_spec(images, "baked", "test-swapped", weights), image_id=WRONG_DIGEST)
    with pytest.raises(DriverError, match="is not the verified image") as err:
        docker_driver.start(spec)
    assert images["baked"][1] in str(err.value) and WRONG_DIGEST in str(err.value)
    missing = replace(spec, image="llmctl-test-drivers:never-built")
    with pytest.raises(DriverError, match="build or pull it"):
        docker_driver.start(missing)
    no_weights = replace(_docker_spec(images, "mounted", "test-noweights", weights), weights=None)
    with pytest.raises(DriverError, match="mounted weights"):
        docker_driver.start(no_weights)
    other = replace(_docker_spec(images, "baked", "test-otherweights", weights), weights_sha256=WRONG_DIGEST)
    with pytest.raises(DriverError, match="serves weights"):
        docker_driver.start(other)
    assert docker_client.containers.list(all=True, filters={"name": "llmctl-test-"}) == []


@pytest.mark.slow
def test_docker_port_in_use(
    docker_driver: DockerDriver, docker_client: Any, images: dict[str, tuple[str, str]], weights: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} "):
            docker_driver.start(_docker_spec(images, "baked", "test-busy", weights, port=port))
    assert docker_client.containers.list(all=True, filters={"name": "llmctl-test-busy"}) == []
    # a port a running container holds: docker-proxy listens there, so the check sees it too
    first = docker_driver.start(_docker_spec(images, "baked", "test-busy", weights, port=free_port()))
    port = int(first.endpoint.rsplit(":", 1)[1])
    with pytest.raises(PortInUseError, match=f"port {port} "):
        docker_driver.start(_docker_spec(images, "baked", "test-busy", weights, revision=2, port=port))
    assert [i.revision for i in docker_driver.list(release="test-busy")] == [1]


@pytest.mark.slow
def test_docker_mounted_weights_that_do_not_match_are_refused_without_endless_restarts(
    docker_driver: DockerDriver, docker_client: Any, images: dict[str, tuple[str, str]], weights: Path, tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered.gguf"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    tampered.write_bytes(bytes(data))
    tampered.chmod(0o644)
    spec = replace(_docker_spec(images, "mounted", "test-tampered", weights), weights=tampered)
    instance = docker_driver.start(spec)
    began = time.monotonic()
    assert not docker_driver.wait_healthy(instance, 120)
    assert time.monotonic() - began < 60  # gave up at the first refusal, not at the timeout
    logs = docker_driver.logs(instance, tail=200)
    assert "weights digest mismatch" in logs and "refusing to serve" in logs

    def settled() -> bool:
        return bool(docker_client.api.inspect_container(instance.id)["State"]["Status"] == "exited")

    assert until(settled, 90, every=0.1)  # on-failure:3, not a restart loop
    attrs = docker_client.api.inspect_container(instance.id)
    assert attrs["State"]["ExitCode"] == 1 and attrs["RestartCount"] == 3
    assert [i.state for i in docker_driver.list(release="test-tampered")] == ["exited"]
    docker_driver.remove(instance)
