"""The docker driver: the model server in a hardened container of the verified per-model image.

One container per release revision, named `llmctl-<release>-<revision>` and labeled
`dev.llmctl.managed=true`, `dev.llmctl.release`, `dev.llmctl.revision`, `dev.llmctl.model.digest`.
It runs the image by ID, after checking that the engine's image under the tag is the verified one,
with the image's entrypoint and command (`--host 0.0.0.0 --port 8080 --sha256 <pin>`) plus the
tuning flags of the spec, and:

- a read-only root file system, a 64 MiB noexec tmpfs on /tmp, every capability dropped,
  no-new-privileges, user 65532:65532, a pids limit, the spec's CPU and memory limits (no swap);
- port 8080 published on the spec's host address only (127.0.0.1 unless asked otherwise);
- mounted-weights images get the weights file bind-mounted read-only at the image's weights path;
- `init` (Docker's tini) as PID 1 unless the image brings its own: it reaps zombies and forwards
  SIGTERM, which the runtime handles itself (it drains and exits 0);
- restart policy on-failure, at most 3 retries. Docker cannot tell a crash from the runtime's exit 1
  ("refused to start": weights digest mismatch), so `always`/`unless-stopped` would restart a refused
  container forever; a bounded `on-failure` restarts a crashed or OOM-killed server a few times and
  then leaves a refused one exited, its logs saying why (`wait_healthy` gives up at the first exit 1).
  `docker stop` never triggers a restart.

The API key goes in the container's environment (`LLMCTL_API_KEY`): not on the command line, not in
the logs, but readable with `docker inspect` by whoever can use the engine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import PurePosixPath
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
    PortInUseError,
    check_port_free,
    check_spec,
    endpoint_url,
    free_port,
    health_from_probe,
    healthy_by,
    instance_name,
    probe_health,
    sleep_before,
)
from manager.model_image import PORT, WEIGHTS_DIGEST_LABEL, WEIGHTS_MOUNTED_LABEL, WEIGHTS_PATH_LABEL

LABEL_IMAGE = "dev.llmctl.image"  # the tag it was started from (the container runs the image by ID)

PING_TIMEOUT = 3.0  # seconds for the engine to answer when choosing a driver
ENGINE_TIMEOUT = 120.0  # seconds for any other engine request
PIDS_LIMIT = 1024  # one compute thread per CPU plus the HTTP server's: far below, unless something forks
RESTART_POLICY = {"Name": "on-failure", "MaximumRetryCount": 3}
TMPFS = {"/tmp": "rw,noexec,nosuid,size=64m"}
INITS = {"tini", "tini-static", "dumb-init", "docker-init", "catatonit"}
CONTAINER_PORT = f"{PORT}/tcp"

_STATES = {
    "created": "created",
    "running": "running",
    "paused": "running",
    "restarting": "restarting",
    "removing": "exited",
    "exited": "exited",
    "dead": "exited",
}


def _reason(error: BaseException) -> str:
    """The root cause of a connection failure in a few words ("Connection refused"), found down the
    exception chain (docker -> requests -> urllib3 -> OSError); else the error's own message."""
    todo: list[BaseException] = [error]
    seen: set[int] = set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        todo += [c for c in (e.__cause__, e.__context__, getattr(e, "reason", None)) if isinstance(c, BaseException)]
        todo += [a for a in e.args if isinstance(a, BaseException)]
    return " ".join(str(error).split()) or type(error).__name__


def _unreachable(error: BaseException) -> DriverUnavailableError:
    return DriverUnavailableError(
        f"the Docker engine is not reachable ({_reason(error)}); start it, or use --driver process"
    )


def connect(ping_timeout: float = PING_TIMEOUT) -> Any:
    """A `docker.DockerClient` for the engine of the environment (DOCKER_HOST, or the local socket)
    that answered a ping within `ping_timeout` seconds; `DriverUnavailableError` otherwise."""
    try:
        import docker
        import requests
    except ImportError as e:
        raise DriverUnavailableError(
            f"the Docker engine is not reachable (the docker Python package is missing: {e}); "
            "install it, or use --driver process"
        ) from e
    try:
        client = docker.from_env(timeout=ping_timeout)  # asks the engine for its API version
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as e:
        raise _unreachable(e) from e
    client.api.timeout = ENGINE_TIMEOUT
    return client


@contextlib.contextmanager
def _engine_errors(what: str) -> Iterator[None]:
    """Map the docker SDK's errors to llmctl's, at the boundary."""
    import docker
    import requests

    try:
        yield
    except DriverError:
        raise
    except docker.errors.APIError as e:
        raise DriverError(f"{what}: {' '.join(str(e.explanation or e).split())}") from e
    except requests.exceptions.ConnectionError as e:
        raise _unreachable(e) from e
    except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
        raise DriverError(f"{what}: {' '.join(str(e).split())}") from e


def _port_taken(error: Any) -> bool:
    # The engine reports a taken port only in the message of a 500 answer.
    text = str(getattr(error, "explanation", None) or error)
    return "port is already allocated" in text or "address already in use" in text


def _docker_time(value: str | None) -> datetime | None:
    """Docker's RFC 3339 time (nanoseconds, "Z"); None for its zero time or nothing."""
    if not value or value.startswith("0001-"):
        return None
    return datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else ""


def _has_init(entrypoint: list[str] | None) -> bool:
    return bool(entrypoint) and PurePosixPath(entrypoint[0] if entrypoint else "").name in INITS


def _endpoint(attrs: dict[str, Any]) -> str:
    bindings = (attrs["HostConfig"].get("PortBindings") or {}).get(CONTAINER_PORT) or []
    if not bindings or not bindings[0].get("HostPort"):
        return ""
    return endpoint_url(bindings[0].get("HostIp") or "0.0.0.0", int(bindings[0]["HostPort"]))


class DockerDriver:
    """Model servers as hardened containers on the local Docker engine."""

    name = "docker"

    def __init__(self, client: Any = None) -> None:
        self.client = client if client is not None else connect()

    # --- helpers ---------------------------------------------------------------------------------

    def _verified_image(self, spec: InstanceSpec) -> Any:
        """The engine's image under `spec.image`, if it is the verified one (by ID)."""
        import docker

        try:
            image = self.client.images.get(spec.image)
        except docker.errors.ImageNotFound:
            raise DriverError(f"image {spec.image} is not in the Docker engine; build or pull it") from None
        if image.id != spec.image_id:
            raise DriverError(
                f"the engine's {spec.image} is not the verified image (engine: {image.id}, verified: "
                f"{spec.image_id}); rebuild or pull it"
            )
        labels = image.attrs["Config"].get("Labels") or {}
        if labels.get(WEIGHTS_DIGEST_LABEL) != spec.weights_sha256:
            raise DriverError(
                f"image {spec.image} serves weights {labels.get(WEIGHTS_DIGEST_LABEL)}, "
                f"not the release's {spec.weights_sha256}"
            )
        if labels.get(WEIGHTS_PATH_LABEL) != spec.weights_in_image:
            raise DriverError(
                f"image {spec.image} reads its weights from {labels.get(WEIGHTS_PATH_LABEL)}, "
                f"not {spec.weights_in_image}"
            )
        return image

    def _clear_leftover(self, name: str) -> None:
        """Remove a stopped container of this name (left by a crash); refuse to touch a live one."""
        import docker

        try:
            old = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        if (old.labels or {}).get(LABEL_MANAGED) != "true":
            raise DriverError(f"a container named {name} exists and is not llmctl's; rename or remove it")
        if old.status in ("running", "restarting", "paused"):
            raise DriverError(f"container {name} is already {old.status}; stop it first")
        old.remove(force=True)

    def _container(self, instance: Instance) -> Any | None:
        import docker

        try:
            return self.client.containers.get(instance.id)
        except docker.errors.NotFound:
            return None

    def _health(self, attrs: dict[str, Any]) -> str:
        state = attrs["State"]
        if state.get("Status") != "running":
            return "unknown"
        docker_health = (state.get("Health") or {}).get("Status")
        if docker_health in ("healthy", "unhealthy"):
            return str(docker_health)
        # no health check, or still in its start period: ask the server
        started = _docker_time(state.get("StartedAt"))
        running_for = (datetime.now(UTC) - started).total_seconds() if started else 0.0
        return health_from_probe(probe_health(_endpoint(attrs)), running_for)

    def _instance(self, container: Any, *, with_health: bool = True) -> Instance:
        attrs = container.attrs
        labels = attrs["Config"].get("Labels") or {}
        state = attrs["State"]
        started = _docker_time(state.get("StartedAt")) or _docker_time(attrs.get("Created"))
        return Instance(
            id=container.id,
            release=labels.get(LABEL_RELEASE, ""),
            revision=int(labels.get(LABEL_REVISION, "0")),
            driver=self.name,
            endpoint=_endpoint(attrs),
            state=_STATES.get(state.get("Status", ""), "exited"),
            health=self._health(attrs) if with_health else "unknown",
            started=_iso(started),
            model_digest=labels.get(LABEL_MODEL_DIGEST, ""),
            image=str(attrs.get("Image") or ""),
        )

    # --- the interface ---------------------------------------------------------------------------

    def start(self, spec: InstanceSpec) -> Instance:
        import docker

        check_spec(spec)
        if not spec.image:
            raise DriverError("the docker driver needs an image: the spec names none")
        name = instance_name(spec.release, spec.revision)
        with _engine_errors(f"cannot start {name}"):
            image = self._verified_image(spec)
            config = image.attrs["Config"]
            mounts = []
            if (config.get("Labels") or {}).get(WEIGHTS_MOUNTED_LABEL) == "true":
                if spec.weights is None or not spec.weights.is_file():
                    raise DriverError(
                        f"image {spec.image} serves mounted weights: the weights file "
                        f"{spec.weights or '(none given)'} must exist on the host"
                    )
                mounts.append(
                    docker.types.Mount(
                        target=spec.weights_in_image, source=str(spec.weights.resolve()), type="bind", read_only=True
                    )
                )
            self._clear_leftover(name)
            if spec.port:
                check_port_free(spec.host, spec.port)
                port = spec.port
            else:
                port = free_port(spec.host)
            limits: dict[str, Any] = {}
            if spec.cpus is not None:
                limits["nano_cpus"] = int(spec.cpus * 1e9)
            if spec.memory is not None:
                limits["mem_limit"] = spec.memory
                limits["memswap_limit"] = spec.memory  # no swap on top
            container = self.client.containers.create(
                image.id,  # by ID: the verified bytes, even if the tag moves meanwhile
                command=[*(config.get("Cmd") or []), *spec.server_args()],
                name=name,
                labels={
                    LABEL_MANAGED: "true",
                    LABEL_RELEASE: spec.release,
                    LABEL_REVISION: str(spec.revision),
                    LABEL_MODEL_DIGEST: spec.weights_sha256,
                    LABEL_IMAGE: spec.image,
                },
                environment={"LLMCTL_API_KEY": spec.api_key} if spec.api_key else {},
                ports={CONTAINER_PORT: (spec.host, port)},
                mounts=mounts,
                user=f"{USER_ID}:{USER_ID}",
                read_only=True,
                tmpfs=TMPFS,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                pids_limit=PIDS_LIMIT,
                init=not _has_init(config.get("Entrypoint")),
                restart_policy=RESTART_POLICY,
                detach=True,
                **limits,
            )
            try:
                container.start()
            except docker.errors.APIError as e:
                container.remove(force=True)
                if _port_taken(e):
                    raise PortInUseError(
                        f"port {port} on {spec.host} is already in use ({' '.join(str(e.explanation).split())}); "
                        "choose another port"
                    ) from e
                raise
            container.reload()
            return self._instance(container, with_health=False)

    def wait_healthy(self, instance: Instance, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if healthy_by(instance.endpoint, deadline):
                return True
            with _engine_errors(f"cannot inspect {instance.id[:12]}"):
                container = self._container(instance)
            if container is None:
                return False
            state = container.attrs["State"]
            if state.get("Status") in ("exited", "dead", "removing"):
                return False
            if state.get("Status") == "restarting" and state.get("ExitCode") == 1:
                return False  # the runtime refused to start: restarts will not help
            if time.monotonic() >= deadline:
                return False
            sleep_before(deadline, 0.25)

    def health(self, instance: Instance) -> str:
        with _engine_errors(f"cannot inspect {instance.id[:12]}"):
            container = self._container(instance)
            return "unknown" if container is None else self._health(container.attrs)

    def stop(self, instance: Instance, timeout: float = 30) -> None:
        with _engine_errors(f"cannot stop {instance.id[:12]}"):
            container = self._container(instance)
            if container is None:
                return  # already gone
            container.stop(timeout=max(0, int(timeout)))

    def remove(self, instance: Instance) -> None:
        with _engine_errors(f"cannot remove {instance.id[:12]}"):
            container = self._container(instance)
            if container is None:
                return
            if container.status in ("running", "restarting", "paused"):
                raise DriverError(f"container {container.name} is {container.status}; stop it first")
            container.remove(v=True)

    def list(self, release: str | None = None) -> list[Instance]:
        filters = [f"{LABEL_MANAGED}=true"]
        if release is not None:
            filters.append(f"{LABEL_RELEASE}={release}")
        with _engine_errors("cannot list containers"):
            containers = self.client.containers.list(all=True, filters={"label": filters})
            return [self._instance(c) for c in containers]

    def logs(self, instance: Instance, tail: int = 50) -> str:
        with _engine_errors(f"cannot read the logs of {instance.id[:12]}"):
            container = self._container(instance)
            if container is None:
                return ""
            data = container.logs(stdout=True, stderr=True, tail=max(0, tail))
            return bytes(data).decode("utf-8", errors="replace")
