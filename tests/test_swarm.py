"""The swarm driver on a real single-node swarm: `--driver swarm` installs, rolling upgrades (health-
gated, start-first, under load), upgrades that swarm or llmctl roll back, `llmctl rollback`, uninstall.

The module initialises the swarm (`docker swarm init --advertise-addr 127.0.0.1`) if the engine is not
in one, and leaves it at the end; a swarm it did not create it never leaves.

Swarm's routing mesh needs IPVS in the kernel. Where the kernel has none (a VM kernel without
modules, for one), the mesh cannot run: the tests then publish ports in host mode (one replica), and
the test under load routes its requests the way the mesh does, to the tasks that are running and
healthy and not being stopped, on their own addresses. Where IPVS is there, everything goes through
the published port.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from manager import actions
from manager.drivers import DriverError, DriverUnavailableError, InstanceSpec, get_driver
from manager.drivers.swarm import PUBLISH_ENV, SwarmDriver, service_name
from manager.releases import ReleaseStore
from tests.polling import until
from tests.releasehome import demo_sets, demo_weights, fails, home_copy, ok, prepared_home

PASSWORD = "swarm tests"
MESH = Path("/proc/sys/net/ipv4/vs").is_dir()  # IPVS: the routing mesh works on this (the engine's) kernel
COMPLETION = {"prompt": "def add(a, b):\n    return ", "max_tokens": 4, "temperature": 0}

pytestmark = pytest.mark.slow


def _swarm_info(client: Any) -> dict[str, Any]:
    return dict(client.info().get("Swarm") or {})


# --- first, before any swarm: the driver refuses to start one itself --------------------------------


def test_the_driver_wants_a_swarm_manager_and_never_makes_one(docker_client: Any) -> None:
    if _swarm_info(docker_client).get("LocalNodeState") == "active":
        pytest.skip("the engine is already in a swarm (not ours to leave): nothing to check")
    with pytest.raises(DriverUnavailableError) as err:
        get_driver("swarm")
    message = str(err.value)
    assert "not part of a swarm" in message and "docker swarm init" in message and "--driver docker" in message
    assert _swarm_info(docker_client).get("LocalNodeState") == "inactive"  # it did not init one


# --- the swarm and a prepared llmctl home -----------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(docker_client: Any) -> Iterator[Any]:
    """A swarm manager: the engine's own if it is one, else a single-node swarm made here and left after."""
    info = _swarm_info(docker_client)
    made = info.get("LocalNodeState") != "active"
    had_gateway = bool(docker_client.networks.list(names=["docker_gwbridge"]))
    if made:
        run = subprocess.run(
            ["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
    elif not info.get("ControlAvailable"):
        pytest.skip("the engine is a swarm worker: the swarm driver needs a manager")
    try:
        yield docker_client
    finally:
        for service in docker_client.api.services(filters={"label": "dev.llmctl.managed=true"}):
            if service["Spec"]["Name"].startswith("llmctl-sw-"):  # only what these tests made
                docker_client.api.remove_service(service["ID"])
        if made:
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True, check=True)
            if not had_gateway:  # `swarm init` made it, `swarm leave` keeps it
                subprocess.run(["docker", "network", "rm", "docker_gwbridge"], capture_output=True)


@pytest.fixture
def engine(swarm: Any) -> Iterator[Any]:
    """The swarm's engine; whatever service a test leaves behind goes after it."""
    yield swarm
    for service in swarm.api.services(filters={"label": "dev.llmctl.managed=true"}):
        if service["Spec"]["Name"].startswith("llmctl-sw-"):
            swarm.api.remove_service(service["ID"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """A home with a key and the demo image built, and the demo chart's --set flags."""
    work = tmp_path_factory.mktemp("swarm")
    sets = demo_sets(*demo_weights(work))
    with prepared_home(work, PASSWORD, sets) as home:
        yield home, sets


@pytest.fixture
def home(prepared: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv(PUBLISH_ENV, raising=False)
    yield from home_copy(prepared[0], tmp_path, monkeypatch, PASSWORD)


@pytest.fixture
def demo(prepared: tuple[Path, list[str]]) -> list[str]:
    return prepared[1]


def complete(endpoint: str) -> int:
    r = httpx.post(f"{endpoint}/v1/completions", json=COMPLETION, timeout=60)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def slots(endpoint: str) -> int:
    return int(httpx.get(f"{endpoint}/props", timeout=10).json()["total_slots"])


def _service(client: Any, release: str) -> dict[str, Any]:
    return dict(client.api.inspect_service(service_name(release)))


def _template(service: dict[str, Any]) -> dict[str, Any]:
    """A service's task template without what differs between any two revisions (the revision label)."""
    template = json.loads(json.dumps(service["Spec"]["TaskTemplate"]))
    template["ContainerSpec"]["Labels"].pop("dev.llmctl.revision")
    template.pop("ForceUpdate", None)
    return dict(template)


# --- the mesh, or where it cannot run, a stand-in that routes as it does ----------------------------


@dataclass
class Load:
    """Completion requests sent without pause from a few threads, each on a new connection, to the
    published port (the routing mesh) or, without IPVS, to the address of a task the mesh would pick:
    swarm puts a task behind the mesh once its health check passes, and takes it out (2 s before
    SIGTERM) as soon as it is to stop, so a task qualifies while its desired and actual state are
    both "running"."""

    client: Any
    service_id: str
    endpoint: str
    threads: int = 2
    served: dict[str, int] = field(default_factory=dict)  # by revision label
    fewest_routable: int = 1 << 30  # the fewest tasks the stand-in could route to at any time
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _turn: int = 0

    def _target(self) -> tuple[str, str]:
        """(base URL, revision) for the next request."""
        if MESH:
            return self.endpoint, "?"
        tasks = [
            t
            for t in self.client.api.tasks(filters={"service": self.service_id})
            if t["DesiredState"] == "running" and t["Status"]["State"] == "running"
        ]
        gateway = self.client.api.inspect_network("docker_gwbridge")["Containers"]
        routable = []
        for task in sorted(tasks, key=lambda t: t["ID"]):
            container = task["Status"]["ContainerStatus"]["ContainerID"]
            if container in gateway:
                address = gateway[container]["IPv4Address"].split("/")[0]
                routable.append(
                    (f"http://{address}:8080", task["Spec"]["ContainerSpec"]["Labels"]["dev.llmctl.revision"])
                )
        with self._lock:
            self.fewest_routable = min(self.fewest_routable, len(routable))
            if not routable:
                return "", "none"
            self._turn += 1
            return routable[self._turn % len(routable)]

    def _work(self) -> None:
        while not self._stop.is_set():
            url, revision = "", "?"
            try:
                url, revision = self._target()
                if not url:
                    raise RuntimeError("no task is routable")
                complete(url)
                with self._lock:
                    self.served[revision] = self.served.get(revision, 0) + 1
            except Exception as e:  # every kind of failure counts
                with self._lock:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {url} (revision {revision}): {e!r}")

    def __enter__(self) -> Load:
        import docker

        self.client = docker.from_env()  # its own connections: the test's client stays the test's
        self._workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=90)
        self.client.close()

    @property
    def total(self) -> int:
        return sum(self.served.values()) + len(self.failures)


def _spec(name: str, revision: int, demo: list[str], driver: SwarmDriver, *sets: str) -> InstanceSpec:
    """What `llmctl install|upgrade` hands the driver: rendered, built or reused, verified, loaded."""
    flags = [v for k, v in zip(demo[::2], demo[1::2], strict=True) if k == "--set"]
    opts = actions.Options(sets=[*flags, *sets], progress=False)
    rendered = actions.render("demo", opts, name=name, revision=revision, upgrade=revision > 1)
    image, digest = actions.ensure_image(rendered.manifest, opts)
    return actions.instance_spec(name, revision, rendered.manifest, image, digest, driver)


def _converged(driver: SwarmDriver, instance: Any, timeout: float) -> bool:
    """Every replica runs the instance's revision, healthy, and the update (if any) completed; through
    the published port too where the mesh works."""
    if MESH:
        return driver.wait_healthy(instance, timeout)

    def done() -> bool:
        rollout = driver.rollout(instance)
        assert rollout is not None and rollout.current == instance.revision, rollout
        return rollout.converged and rollout.state in (None, "completed", "rollback_completed")

    return until(done, timeout, every=0.5)


# --- the tests --------------------------------------------------------------------------------------


def test_two_replicas_upgrade_and_roll_back_under_load_without_a_failed_request(
    engine: Any, home: Path, demo: list[str]
) -> None:
    driver = get_driver("swarm")
    assert isinstance(driver, SwarmDriver) and driver.publish_mode == "ingress"
    first = driver.start(replace(_spec("sw-load", 1, demo, driver), replicas=2))
    assert first.driver == "swarm" and first.revision == 1 and first.endpoint.startswith("http://127.0.0.1:")
    assert _converged(driver, first, 120), driver.logs(first)

    service = _service(engine, "sw-load")
    assert service["Spec"]["Mode"] == {"Replicated": {"Replicas": 2}}
    assert service["Spec"]["UpdateConfig"]["Order"] == "start-first"
    assert service["Spec"]["UpdateConfig"]["FailureAction"] == "rollback"
    with Load(engine, first.id, first.endpoint) as load:
        until(lambda: load.total >= 10, 30, every=0.25)
        began = time.monotonic()
        second = driver.start(replace(_spec("sw-load", 2, demo, driver, "server.parallel=3"), replicas=None))
        assert second.id == first.id and second.endpoint == first.endpoint  # the same service, the same port
        assert _converged(driver, second, 180), driver.logs(second)
        upgraded = time.monotonic() - began
        during_upgrade = dict(load.served)

        back = driver.rollback("sw-load", timeout=180)  # `docker service rollback`: the previous spec
        assert back.revision == 1
        until(lambda: load.total >= sum(during_upgrade.values()) + 10, 30, every=0.25)
    assert load.failures == [], f"{len(load.failures)} of {load.total} requests failed: {load.failures[:5]}"
    assert load.total >= 30
    if not MESH:  # the stand-in knows which revision answered: both did, and rev 2 served before the rollback
        assert during_upgrade.get("1") and during_upgrade.get("2"), during_upgrade
        assert load.fewest_routable == 2  # start-first: two healthy replicas behind the mesh all the time
    print(f"\n{load.total} requests, none failed; upgrade of 2 replicas took {upgraded:.0f} s; served: {load.served}")

    service = _service(engine, "sw-load")
    assert service["Spec"]["Labels"]["dev.llmctl.revision"] == "1"
    assert service["UpdateStatus"]["State"] == "rollback_completed"
    [listed] = driver.list("sw-load")
    assert (listed.id, listed.revision, listed.state) == (first.id, 1, "running")
    driver.stop(second)  # the service left revision 2: retiring it does nothing
    driver.remove(second)
    assert driver.list("sw-load") != []
    with pytest.raises(DriverError, match="stop it first"):
        driver.remove(listed)
    driver.stop(listed)
    driver.remove(listed)
    assert driver.list("sw-load") == []
    label = f"com.docker.engine.service.id={first.id}"
    assert engine.containers.list(all=True, filters={"label": label}) == []


def test_install_upgrade_failed_upgrades_rollback_uninstall(
    engine: Any, home: Path, demo: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mode, replicas = ("ingress", "2") if MESH else ("host", "1")
    monkeypatch.setenv(PUBLISH_ENV, mode)
    err = fails(capsys, "install", "sw-life", "demo", *demo, "--driver", "process", "--replicas", "2")
    assert "--replicas needs --driver swarm" in err and ReleaseStore().list(all=True) == []

    out = ok(capsys, "install", "sw-life", "demo", *demo, "--driver", "swarm", "--replicas", replicas)
    assert "STATUS: deployed" in out and "DRIVER: swarm" in out
    first = ReleaseStore().get("sw-life")
    endpoint = str(first.endpoint)
    assert first.driver == "swarm" and complete(endpoint) >= 1 and slots(endpoint) == 2
    service = _service(engine, "sw-life")
    assert first.instance_id == service["ID"]
    spec1 = _template(service)
    container = service["Spec"]["TaskTemplate"]["ContainerSpec"]
    image_id = engine.images.get("llmctl/demo:1.0.0").id
    assert container["Image"] == image_id  # by ID: the verified bytes
    assert container["ReadOnly"] is True and container["CapabilityDrop"] == ["ALL"] and container["Init"] is True
    assert container["User"] == "65532:65532" and "--sha256" in container["Args"]
    assert container["Mounts"][0]["Type"] == "tmpfs" and container["Mounts"][0]["Target"] == "/tmp"
    assert service["Spec"]["TaskTemplate"]["Resources"]["Limits"]["Pids"] > 0
    labels = service["Spec"]["Labels"]
    assert (labels["dev.llmctl.managed"], labels["dev.llmctl.release"], labels["dev.llmctl.revision"]) == (
        "true",
        "sw-life",
        "1",
    )
    [task] = [t for t in engine.api.tasks(filters={"service": service["ID"]}) if t["Status"]["State"] == "running"][:1]
    attrs = engine.api.inspect_container(task["Status"]["ContainerStatus"]["ContainerID"])
    assert attrs["HostConfig"]["ReadonlyRootfs"] is True and attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert attrs["Config"]["User"] == "65532:65532" and "dev.llmctl.managed" not in attrs["Config"]["Labels"]
    status = json.loads(ok(capsys, "status", "sw-life", "-o", "json"))
    assert (status["instance"]["revision"], status["instance"]["health"]) == (1, "healthy")
    assert [i["release"] for i in json.loads(ok(capsys, "ps", "-o", "json", "--driver", "swarm"))] == ["sw-life"]

    # a rolling upgrade: the same service and endpoint, the new spec
    ok(capsys, "upgrade", "sw-life", "demo", "--reuse-values", "--set", "server.parallel=3")
    second = ReleaseStore().get("sw-life")
    assert (second.revision, second.status, second.endpoint, second.instance_id) == (
        2,
        "deployed",
        endpoint,
        first.instance_id,
    )
    assert slots(endpoint) == 3 and _service(engine, "sw-life")["Spec"]["Labels"]["dev.llmctl.revision"] == "2"
    assert ReleaseStore().get("sw-life", 1).status == "superseded"

    # an upgrade whose tasks die at start (16 MiB of memory): swarm rolls it back by itself
    err = fails(capsys, "upgrade", "sw-life", "demo", "--reuse-values", "--set", "resources.memory=16m")
    assert "swarm rolled the update back" in err and "revision 2 serves again" in err, err
    assert [r.status for r in ReleaseStore().history("sw-life")] == ["superseded", "deployed", "failed"]
    assert _service(engine, "sw-life")["Spec"]["Labels"]["dev.llmctl.revision"] == "2"
    assert complete(endpoint) >= 1 and slots(endpoint) == 3  # revision 2 kept serving

    # `llmctl rollback`: the previous revision's spec, as a new revision
    ok(capsys, "rollback", "sw-life")
    fourth = ReleaseStore().get("sw-life")
    assert (fourth.revision, fourth.description, fourth.endpoint) == (4, "Rollback to 1", endpoint)
    service = _service(engine, "sw-life")
    assert _template(service) == spec1 and service["Spec"]["Labels"]["dev.llmctl.revision"] == "4"
    assert slots(endpoint) == 2 and complete(endpoint) >= 1

    # an upgrade that is not done within --timeout: llmctl rolls the service back itself (--atomic records it)
    err = fails(
        capsys,
        "upgrade",
        "sw-life",
        "demo",
        "--reuse-values",
        "--set",
        "server.parallel=4",
        "--timeout",
        "2",
        "--atomic",
    )
    assert "rolled back to revision 4" in err, err
    revs = ReleaseStore().history("sw-life")
    assert [r.status for r in revs][-2:] == ["failed", "deployed"] and "Rollback to 4" in revs[-1].description
    assert _service(engine, "sw-life")["Spec"]["Labels"]["dev.llmctl.revision"] == "4"
    assert complete(endpoint) >= 1 and slots(endpoint) == 2

    service_id = _service(engine, "sw-life")["ID"]
    assert 'release "sw-life" uninstalled' in ok(capsys, "uninstall", "sw-life")
    assert engine.api.services(filters={"name": service_name("sw-life")}) == []
    label = f"com.docker.engine.service.id={service_id}"
    assert engine.containers.list(all=True, filters={"label": label}) == []
    assert ReleaseStore().list(all=True) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{endpoint}/health", timeout=2)


def test_what_the_driver_refuses(engine: Any, home: Path, demo: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PUBLISH_ENV, "nodeport")
    with pytest.raises(DriverError, match="not a publish mode"):
        get_driver("swarm")
    driver = SwarmDriver(engine, publish_mode="host")
    spec = _spec("sw-refused", 1, demo, driver)
    with pytest.raises(DriverError, match="2 replicas need the routing mesh"):
        driver.start(replace(spec, replicas=2))
    with pytest.raises(DriverError, match="is not the verified image"):
        driver.start(replace(spec, image_id="sha256:" + "0" * 64))
    engine.api.create_service({"ContainerSpec": {"Image": spec.image_id}}, name=service_name("sw-refused"))
    try:
        with pytest.raises(DriverError, match="is not llmctl's"):
            driver.start(spec)
    finally:
        engine.api.remove_service(service_name("sw-refused"))
    assert driver.list("sw-refused") == []
