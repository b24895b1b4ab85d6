"""The swarm driver: a release as one Docker Swarm service with N replicas and rolling upgrades.

One service per release, named `llmctl-<release>` and labelled `dev.llmctl.managed=true`,
`dev.llmctl.release`, `dev.llmctl.revision` (the revision its spec runs now), `dev.llmctl.model.digest`.
Its tasks run the verified image by ID (checked as the docker driver checks it) with the docker
driver's hardening where swarm has it: read-only root, every capability dropped, uid 65532, a 64 MiB
tmpfs on /tmp (docker mounts it nosuid,nodev,noexec), a pids limit, the spec's CPU and memory
limits, init unless the image brings one. Engines that do not know `Privileges.NoNewPrivileges`
(20.10 and older; docs/swarm.md) drop it: their tasks run without no-new-privileges.

A revision is not a container here but a version of the service's spec, so the driver interface
maps onto it this way:

- `start(spec)` creates the service, or, when the release has one, UPDATES it to the new revision:
  one task at a time, health-gated (a task counts as running only once the image's health check
  passes), start-first behind the routing mesh (the old task leaves the load balancer only once its
  replacement is healthy), and rolled back by swarm itself if a new task fails within the monitor
  window. The Instance it returns has the service's ID and the new revision;
- `wait_healthy` waits until the update completed, every replica runs the new revision and the
  published port answers /health. When it gives up (timeout, a paused update) it rolls the service
  back to its previous spec before returning False, so the revision before keeps serving;
- `list` gives one Instance per service, with the revision its spec runs now; `stop`/`remove` of an
  instance whose revision the service no longer runs do nothing (the same service moved on), and
  of the current one remove the service;
- `rollback(release)` is `docker service rollback`: the service's previous spec.

Ports: `ingress` publishing (the default) goes through swarm's routing mesh, which listens on every
interface of every node, whatever `network.host` says, and needs IPVS in the kernel. `host` publishing
(`LLMCTL_SWARM_PUBLISH=host`) binds the port on the node itself, also on every interface; it needs no
IPVS but allows one replica per node and upgrades stop-first (a short gap). Tasks are placed on the
node llmctl talks to: that is where the verified image (and mounted weights) are.

The driver never initialises a swarm: `docker swarm init` is the operator's decision.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from manager.base_image import USER_ID
from manager.drivers.base import (
    LABEL_MANAGED,
    LABEL_MODEL_DIGEST,
    LABEL_RELEASE,
    LABEL_REVISION,
    DriverError,
    DriverUnavailableError,
    Instance,
    InstanceSpec,
    check_port_free,
    check_spec,
    endpoint_url,
    free_port,
    health_from_probe,
    probe_health,
)
from manager.drivers.docker import (
    LABEL_IMAGE,
    PIDS_LIMIT,
    DockerDriver,
    _docker_time,
    _engine_errors,
    _has_init,
    _iso,
    connect,
)
from manager.model_image import PORT, WEIGHTS_MOUNTED_LABEL

LABEL_HOST = "dev.llmctl.endpoint.host"  # the address the endpoint is reached on (the mesh binds all)
PUBLISH_ENV = "LLMCTL_SWARM_PUBLISH"
PUBLISH_MODES = ("ingress", "host")

SECOND = 1_000_000_000  # the engine's durations are in nanoseconds
HEALTH_INTERVAL = 5  # seconds between health checks (the image's 10 s would make every rollout step slower)
MONITOR = 10  # seconds swarm watches a new task for failure before the update counts as done
MAX_RESTARTS = 3  # per task slot, as the docker driver's on-failure:3 (a refused start must not loop)
STOP_GRACE = 30  # seconds between SIGTERM and SIGKILL (the runtime drains in a few)
TMPFS_BYTES = 64 << 20
MESH_GRACE = 20.0  # seconds the published port may stay silent once every replica is healthy
ROLLBACK_WAIT = 180.0  # seconds to wait for a rollback to settle
POLL = 0.5

# swarm's task states: the ones where a container may still come up, and the final failures
_TASK_PENDING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}
_TASK_FAILED = {"failed", "rejected", "orphaned"}


def service_name(release: str) -> str:
    return f"llmctl-{release}"


def _revision(service: dict[str, Any]) -> int:
    return int(((service.get("Spec") or {}).get("Labels") or {}).get(LABEL_REVISION, "0") or 0)


def _task_revision(task: dict[str, Any]) -> int:
    labels = task["Spec"]["ContainerSpec"].get("Labels") or {}
    return int(labels.get(LABEL_REVISION, "0") or 0)


def _published_port(service: dict[str, Any]) -> int:
    for port in (service.get("Endpoint") or {}).get("Ports") or []:
        if port.get("TargetPort") == PORT and port.get("PublishedPort"):
            return int(port["PublishedPort"])
    for port in ((service.get("Spec") or {}).get("EndpointSpec") or {}).get("Ports") or []:
        if port.get("TargetPort") == PORT and port.get("PublishedPort"):
            return int(port["PublishedPort"])
    return 0


def _endpoint(service: dict[str, Any]) -> str:
    port = _published_port(service)
    host = ((service.get("Spec") or {}).get("Labels") or {}).get(LABEL_HOST, "127.0.0.1")
    return endpoint_url(host, port) if port else ""


@dataclass
class Rollout:
    """Where a service stands with one revision: its tasks, as the orchestrator reports them."""

    revision: int  # the revision asked about
    current: int  # the revision the service's spec runs now
    state: str | None  # the service's UpdateStatus: updating, completed, paused, rollback_*; None: never updated
    desired: int  # replicas
    running: int  # tasks of the revision that run and passed their health check
    pending: int  # tasks of the revision on their way up
    others: int  # tasks of other revisions still meant to run
    failures: list[str]  # "task <id>: <state>: <error>" of the revision's failed tasks, newest first
    refused: bool  # a task of the revision exited 1 (the runtime refused to start) or was rejected

    @property
    def converged(self) -> bool:
        return self.running == self.desired and self.others == 0

    @property
    def exhausted(self) -> bool:
        """Swarm gave up restarting: nothing runs or starts, and more failures than its restart policy allows."""
        return not self.running and not self.pending and len(self.failures) > MAX_RESTARTS

    def summary(self) -> str:
        return (
            f"{self.running}/{self.desired} replicas healthy, {self.pending} starting, {self.others} of other revisions"
        )


class SwarmDriver:
    """Model servers as one replicated service per release on a Docker Swarm manager."""

    name = "swarm"

    def __init__(self, client: Any = None, publish_mode: str | None = None) -> None:
        self.client = client if client is not None else connect()
        mode = publish_mode or os.environ.get(PUBLISH_ENV) or "ingress"
        if mode not in PUBLISH_MODES:
            raise DriverError(f"{PUBLISH_ENV}={mode!r} is not a publish mode: use ingress or host")
        self.publish_mode = mode
        with _engine_errors("cannot ask the Docker engine about its swarm"):
            swarm = self.client.info().get("Swarm") or {}
        state = swarm.get("LocalNodeState") or "inactive"
        if state != "active":
            raise DriverUnavailableError(
                f"the Docker engine is not part of a swarm (swarm: {state}); run `docker swarm init` "
                "(a single node is fine) or use --driver docker"
            )
        if not swarm.get("ControlAvailable"):
            raise DriverUnavailableError(
                "the Docker engine is a swarm worker, not a manager; point DOCKER_HOST at a manager "
                "or use --driver docker"
            )
        self.node_id = str(swarm["NodeID"])
        self._docker = DockerDriver(self.client)  # for its check of the verified image
        self._notes: dict[tuple[str, int], str] = {}  # why wait_healthy gave up, for logs()

    # --- reading the engine ----------------------------------------------------------------------

    def _service(self, release: str) -> dict[str, Any] | None:
        """The release's service (inspected), or None."""
        import docker

        try:
            service: dict[str, Any] = self.client.api.inspect_service(service_name(release))
        except docker.errors.NotFound:
            return None
        if (service["Spec"].get("Labels") or {}).get(LABEL_MANAGED) != "true":
            raise DriverError(
                f"a service named {service_name(release)} exists and is not llmctl's; remove or rename it"
            )
        return service

    def _mine(self, instance: Instance) -> dict[str, Any] | None:
        """The instance's service if it still exists (the same one: by ID)."""
        service = self._service(instance.release)
        return service if service is not None and service["ID"] == instance.id else None

    def _tasks(self, service: dict[str, Any]) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = self.client.api.tasks(filters={"service": service["ID"]})
        return sorted(tasks, key=lambda t: t.get("CreatedAt", ""), reverse=True)

    def _rollout(self, service: dict[str, Any], revision: int, tasks: list[dict[str, Any]] | None = None) -> Rollout:
        tasks = self._tasks(service) if tasks is None else tasks
        desired = int(((service["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas", 1))
        running = pending = others = 0
        failures: list[str] = []
        refused = False
        for task in tasks:
            status = task.get("Status") or {}
            state = status.get("State", "")
            if _task_revision(task) != revision:
                others += task.get("DesiredState") == "running"
                continue
            if task.get("DesiredState") == "running" and state == "running":
                running += 1
            elif task.get("DesiredState") == "running" and state in _TASK_PENDING:
                pending += 1
            elif state in _TASK_FAILED:
                exit_code = (status.get("ContainerStatus") or {}).get("ExitCode")
                failures.append(f"task {task['ID'][:12]}: {state}: {status.get('Err') or status.get('Message')}")
                refused = refused or state == "rejected" or exit_code == 1
        state = (service.get("UpdateStatus") or {}).get("State")
        return Rollout(revision, _revision(service), state, desired, running, pending, others, failures, refused)

    def rollout(self, instance: Instance) -> Rollout | None:
        """How far the service has come with the instance's revision; None if the service is gone."""
        with _engine_errors(f"cannot inspect service {service_name(instance.release)}"):
            service = self._mine(instance)
            return None if service is None else self._rollout(service, instance.revision)

    def _instance(self, service: dict[str, Any], *, revision: int | None = None, health: str | None = None) -> Instance:
        labels = service["Spec"].get("Labels") or {}
        tasks = self._tasks(service)
        rollout = self._rollout(service, _revision(service) if revision is None else revision, tasks)
        if rollout.running:
            state = "running"
        elif rollout.pending:
            state = "restarting" if rollout.failures else "created"
        else:
            state = "exited" if rollout.failures else "created"
        started = _docker_time(service.get("UpdatedAt")) or _docker_time(service.get("CreatedAt"))
        if health is None:
            health = self._health(service, rollout)
        return Instance(
            id=service["ID"],
            release=labels.get(LABEL_RELEASE, ""),
            revision=_revision(service) if revision is None else revision,
            driver=self.name,
            endpoint=_endpoint(service),
            state=state,
            health=health,
            started=_iso(started),
            model_digest=labels.get(LABEL_MODEL_DIGEST, ""),
            replicas=rollout.desired,
            image=str(((service["Spec"].get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image") or ""),
        )

    def _health(self, service: dict[str, Any], rollout: Rollout) -> str:
        if not rollout.running:
            return "starting" if rollout.pending else "unknown"
        started = _docker_time(service.get("UpdatedAt"))
        running_for = (datetime.now(UTC) - started).total_seconds() if started else 0.0
        return health_from_probe(probe_health(_endpoint(service)), running_for)

    # --- the service's spec ----------------------------------------------------------------------

    def _spec(self, spec: InstanceSpec, image: Any, port: int, replicas: int) -> dict[str, Any]:
        """The ServiceSpec (engine API JSON) that runs `spec` with `image` (the verified one)."""
        import docker

        config = image.attrs["Config"]
        mounts: list[dict[str, Any]] = [
            {"Type": "tmpfs", "Target": "/tmp", "TmpfsOptions": {"SizeBytes": TMPFS_BYTES, "Mode": 0o1777}}
        ]
        if (config.get("Labels") or {}).get(WEIGHTS_MOUNTED_LABEL) == "true":
            if spec.weights is None or not spec.weights.is_file():
                raise DriverError(
                    f"image {spec.image} serves mounted weights: the weights file "
                    f"{spec.weights or '(none given)'} must exist on the host"
                )
            mounts.append(
                {
                    "Type": "bind",
                    "Source": str(spec.weights.resolve()),
                    "Target": spec.weights_in_image,
                    "ReadOnly": True,
                }
            )
        container: dict[str, Any] = {
            "Image": image.id,  # by ID: the verified bytes; swarm never pulls an image named by ID
            "Args": [*(config.get("Cmd") or []), *spec.server_args()],
            "Env": [f"LLMCTL_API_KEY={spec.api_key}"] if spec.api_key else [],
            "Labels": {
                LABEL_RELEASE: spec.release,
                LABEL_REVISION: str(spec.revision),  # every revision restarts the tasks, and says which they run
                LABEL_MODEL_DIGEST: spec.weights_sha256,
            },
            "User": f"{USER_ID}:{USER_ID}",
            "ReadOnly": True,
            "CapabilityDrop": ["ALL"],
            "Privileges": {"NoNewPrivileges": True},  # dropped by engines before API 1.46 (docs/swarm.md)
            "Init": not _has_init(config.get("Entrypoint")),
            "StopSignal": "SIGTERM",
            "StopGracePeriod": STOP_GRACE * SECOND,
            "Mounts": mounts,
        }
        if config.get("Healthcheck"):
            container["Healthcheck"] = {**config["Healthcheck"], "Interval": HEALTH_INTERVAL * SECOND}
        limits: dict[str, Any] = {"Pids": PIDS_LIMIT}
        if spec.cpus is not None:
            limits["NanoCPUs"] = int(spec.cpus * 1e9)
        if spec.memory is not None:
            limits["MemoryBytes"] = int(docker.utils.parse_bytes(spec.memory))
        placement: dict[str, Any] = {"Constraints": [f"node.id=={self.node_id}"]}
        if self.publish_mode == "host":
            placement["MaxReplicas"] = 1
        published: dict[str, Any] = {"Protocol": "tcp", "TargetPort": PORT, "PublishMode": self.publish_mode}
        if port:
            published["PublishedPort"] = port
        order = "start-first" if self.publish_mode == "ingress" else "stop-first"  # a host port has room for one
        update = {
            "Parallelism": 1,
            "Delay": 0,
            "FailureAction": "rollback",
            "Monitor": MONITOR * SECOND,
            "MaxFailureRatio": 0,
            "Order": order,
        }
        return {
            "Name": service_name(spec.release),
            "Labels": {
                LABEL_MANAGED: "true",
                LABEL_RELEASE: spec.release,
                LABEL_REVISION: str(spec.revision),
                LABEL_MODEL_DIGEST: spec.weights_sha256,
                LABEL_IMAGE: spec.image,
                LABEL_HOST: spec.host,
            },
            "TaskTemplate": {
                "ContainerSpec": container,
                "Resources": {"Limits": limits},
                "RestartPolicy": {
                    "Condition": "on-failure",
                    "MaxAttempts": MAX_RESTARTS,
                    "Delay": 5 * SECOND,
                },
                "Placement": placement,
            },
            "Mode": {"Replicated": {"Replicas": replicas}},
            "UpdateConfig": update,
            "RollbackConfig": {**update, "FailureAction": "pause"},
            "EndpointSpec": {"Mode": "vip", "Ports": [published]},
        }

    def _port(self, spec: InstanceSpec, current: dict[str, Any] | None) -> int:
        """The published port: the spec's; else the service's (an upgrade keeps its endpoint); else, for a
        new service, swarm's choice (ingress, 0) or a free one (host)."""
        held = _published_port(current) if current is not None else 0
        if spec.port:
            if spec.port != held:
                check_port_free("0.0.0.0", spec.port)
            return spec.port
        if held:
            return held
        return 0 if self.publish_mode == "ingress" else free_port("0.0.0.0")

    # --- the interface ---------------------------------------------------------------------------

    def start(self, spec: InstanceSpec) -> Instance:
        check_spec(spec)
        if not spec.image:
            raise DriverError("the swarm driver needs an image: the spec names none")
        if spec.replicas is not None and spec.replicas < 1:
            raise DriverError(f"replicas must be at least 1, not {spec.replicas}")
        name = service_name(spec.release)
        with _engine_errors(f"cannot start {name}"):
            image = self._docker._verified_image(spec)
            current = self._service(spec.release)
            if current is not None and _revision(current) == spec.revision:
                raise DriverError(f"service {name} already runs revision {spec.revision}")
            replicas = spec.replicas or (
                int(((current["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas", 1)) if current else 1
            )
            if self.publish_mode == "host" and replicas > 1:
                raise DriverError(
                    f"host publishing binds the port once per node, and llmctl places tasks on this node: "
                    f"{replicas} replicas need the routing mesh (unset {PUBLISH_ENV}); or ask for one replica"
                )
            body = self._spec(spec, image, self._port(spec, current), replicas)
            if current is None:
                created = self.client.api.create_service(
                    body["TaskTemplate"],
                    name=body["Name"],
                    labels=body["Labels"],
                    mode=body["Mode"],
                    update_config=body["UpdateConfig"],
                    rollback_config=body["RollbackConfig"],
                    endpoint_spec=body["EndpointSpec"],
                )
                service_id = created["ID"]
            else:
                service_id = current["ID"]
                self.client.api.update_service(
                    service_id,
                    current["Version"]["Index"],
                    task_template=body["TaskTemplate"],
                    name=body["Name"],
                    labels=body["Labels"],
                    mode=body["Mode"],
                    update_config=body["UpdateConfig"],
                    rollback_config=body["RollbackConfig"],
                    endpoint_spec=body["EndpointSpec"],
                )
            service = self._published(service_id)
            return self._instance(service, revision=spec.revision, health="unknown")

    def _published(self, service_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The service once swarm has allocated its published port (at once, unless swarm picks it)."""
        deadline = time.monotonic() + timeout
        while True:
            service: dict[str, Any] = self.client.api.inspect_service(service_id)
            if _published_port(service) or time.monotonic() >= deadline:
                return service
            time.sleep(0.1)

    def wait_healthy(self, instance: Instance, timeout: float) -> bool:
        """True once the service runs the instance's revision on every replica (the update completed,
        each task passed its health check) and the published port answers /health. False as soon as
        swarm rolled the update back or a task was refused; on a timeout or a paused update the
        service is rolled back to its previous spec (and that awaited) before False is returned."""
        deadline = time.monotonic() + timeout
        key = (instance.id, instance.revision)
        silent_since: float | None = None
        with _engine_errors(f"cannot follow service {service_name(instance.release)}"):
            while True:
                service = self._mine(instance)
                if service is None:
                    self._notes[key] = "the service was removed"
                    return False
                if _revision(service) != instance.revision:
                    status = service.get("UpdateStatus") or {}
                    self._notes[key] = (
                        f"swarm rolled the update back ({status.get('Message') or status.get('State')}); "
                        f"revision {_revision(service)} serves again"
                    )
                    self._settle(instance.release, _revision(service))
                    return False
                tasks = self._tasks(service)
                rollout = self._rollout(service, instance.revision, tasks)
                ours = any(_task_revision(t) == instance.revision for t in tasks)
                state = (service.get("UpdateStatus") or {}).get("State") if ours else "updating"
                if state in ("paused", "rollback_paused"):
                    reason = f"the update paused ({(service.get('UpdateStatus') or {}).get('Message')})"
                    break
                if "PreviousSpec" not in service and (rollout.refused or rollout.exhausted):
                    # a new service: nothing to roll back to, and swarm's restarts will not help
                    reason = "its tasks failed: " + "; ".join(rollout.failures[:2])
                    break
                if rollout.converged and state in (None, "completed", "rollback_completed"):
                    if probe_health(instance.endpoint or _endpoint(service)) == 200:
                        self._notes.pop(key, None)
                        return True
                    silent_since = silent_since or time.monotonic()
                    if time.monotonic() - silent_since >= MESH_GRACE:
                        reason = (
                            f"every replica is healthy but {_endpoint(service)} does not answer: if dockerd logs "
                            "'Could not get ipvs family information', this kernel has no IPVS for the routing mesh; "
                            f"set {PUBLISH_ENV}=host (one replica) or use --driver docker"
                        )
                        break
                else:
                    silent_since = None
                if time.monotonic() >= deadline:
                    reason = f"not done after {timeout:.0f} s: {rollout.summary()}"
                    break
                time.sleep(POLL)
            self._notes[key] = reason
            previous = ((service.get("PreviousSpec") or {}).get("Labels") or {}).get(LABEL_REVISION)
            if previous and int(previous) != instance.revision:  # an update: back to the spec before it
                self._native_rollback(instance.release, instance.revision)
                self._notes[key] = f"{reason}; rolled back to revision {previous}"
                self._settle(instance.release, int(previous))
            return False

    def _native_rollback(self, release: str, revision: int) -> None:
        """`docker service rollback` of a service that runs `revision`: the engine swaps in the previous
        spec and rolls the tasks back with the RollbackConfig. The SDK has no call for it: this is its
        update call with `rollback=previous`. Swarm changes the service's version as its update goes
        on, so a refused write is tried again on a fresh read; if the service left `revision` meanwhile
        (swarm rolled back by itself), nothing is done: its previous spec is now the failed one."""
        import docker

        api = self.client.api
        for attempt in range(3):
            service = self._service(release)
            if service is None or _revision(service) != revision:
                return
            try:
                response = api._post_json(
                    api._url("/services/{0}/update", service["ID"]),
                    data=service["Spec"],
                    params={"version": service["Version"]["Index"], "rollback": "previous"},
                )
                api._result(response, json=True)
                return
            except docker.errors.APIError:
                if attempt == 2:
                    raise
                time.sleep(POLL)

    def _settle(self, release: str, revision: int, timeout: float = ROLLBACK_WAIT) -> bool:
        """Wait until the service runs `revision` on every replica again (a rollback finished)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            service = self._service(release)
            if service is None or _revision(service) != revision:
                return False
            state = (service.get("UpdateStatus") or {}).get("State")
            if state == "rollback_paused":
                return False
            if state in (None, "completed", "rollback_completed") and self._rollout(service, revision).converged:
                return True
            time.sleep(POLL)
        return False

    def rollback(self, release: str, timeout: float = ROLLBACK_WAIT) -> Instance:
        """The release's service back on its previous spec (`docker service rollback`), waited for.
        `DriverError` if there is no service or no previous spec, or if the rollback did not settle."""
        with _engine_errors(f"cannot roll back {service_name(release)}"):
            service = self._service(release)
            if service is None:
                raise DriverError(f"release {release!r} has no swarm service")
            previous = ((service.get("PreviousSpec") or {}).get("Labels") or {}).get(LABEL_REVISION)
            if not previous:
                raise DriverError(f"service {service_name(release)} has no previous spec to roll back to")
            self._native_rollback(release, _revision(service))
            if not self._settle(release, int(previous), timeout):
                raise DriverError(f"the rollback of {service_name(release)} to revision {previous} did not settle")
            settled = self._service(release)
            assert settled is not None
            return self._instance(settled)

    def health(self, instance: Instance) -> str:
        with _engine_errors(f"cannot inspect service {service_name(instance.release)}"):
            service = self._mine(instance)
            if service is None or _revision(service) != instance.revision:
                return "unknown"
            return self._health(service, self._rollout(service, instance.revision))

    def stop(self, instance: Instance, timeout: float = 30) -> None:
        """Remove the service if it runs the instance's revision (its tasks get SIGTERM, and
        `STOP_GRACE` seconds to drain); wait until their containers are gone, at most `timeout` + 15
        seconds. Nothing to do if the service is gone or runs another revision."""
        with _engine_errors(f"cannot stop service {service_name(instance.release)}"):
            service = self._mine(instance)
            if service is None or _revision(service) != instance.revision:
                return
            self.client.api.remove_service(service["ID"])
            deadline = time.monotonic() + max(0.0, timeout) + 15
            label = f"com.docker.swarm.service.id={service['ID']}"
            while time.monotonic() < deadline:
                if not self.client.containers.list(all=True, filters={"label": label}):
                    return
                time.sleep(POLL)

    def remove(self, instance: Instance) -> None:
        with _engine_errors(f"cannot remove service {service_name(instance.release)}"):
            service = self._mine(instance)
            if service is not None and _revision(service) == instance.revision:
                raise DriverError(f"service {service['Spec']['Name']} runs revision {instance.revision}; stop it first")
            self._notes.pop((instance.id, instance.revision), None)

    def list(self, release: str | None = None) -> list[Instance]:
        filters = [f"{LABEL_MANAGED}=true"]
        if release is not None:
            filters.append(f"{LABEL_RELEASE}={release}")
        with _engine_errors("cannot list services"):
            services = self.client.api.services(filters={"label": filters})
            return [self._instance(s) for s in services]

    def logs(self, instance: Instance, tail: int = 50) -> str:
        """Why `wait_healthy` gave up, the revision's failed tasks, and the last `tail` lines of its
        newest task's container."""
        import docker

        lines: list[str] = []
        note = self._notes.get((instance.id, instance.revision))
        with _engine_errors(f"cannot read the logs of service {service_name(instance.release)}"):
            service = self._mine(instance)
            if service is not None:
                tasks = [t for t in self._tasks(service) if _task_revision(t) == instance.revision]
                lines += self._rollout(service, instance.revision, tasks).failures[:3]
                for task in tasks:
                    container_id = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID")
                    if not container_id:
                        continue
                    try:
                        data = self.client.containers.get(container_id).logs(tail=max(0, tail))
                    except docker.errors.NotFound:
                        continue
                    lines += bytes(data).decode("utf-8", errors="replace").splitlines()
                    break
        if note:
            lines.insert(0, note)
        return "\n".join(lines) + ("\n" if lines else "")
