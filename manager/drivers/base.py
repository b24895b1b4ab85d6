"""What every instance driver does: start one release revision's model server, report on it, stop it.

A driver runs `python -m runtime serve` for one release revision: in a hardened container
(`DockerDriver`), as a supervised local process (`ProcessDriver`), as a Docker Swarm service
(`SwarmDriver`) or as a Kubernetes Deployment (`KubernetesDriver`). All speak the same small
interface, return the same `Instance` records and raise the errors below; `get_driver` picks one.

Errors: `DriverUnavailableError` (the backend cannot be used at all), `PortInUseError` (the host
port is taken), `DriverError` for everything else a user can act on (image not the verified one,
instance already running, weights missing, the engine refusing a request).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from manager.errors import LlmctlError

# Labels every llmctl container carries (the process driver keeps the same facts in its state file).
LABEL_RELEASE = "dev.llmctl.release"
LABEL_REVISION = "dev.llmctl.revision"
LABEL_MODEL_DIGEST = "dev.llmctl.model.digest"
LABEL_MANAGED = "dev.llmctl.managed"

STATES = ("running", "exited", "restarting", "created")
HEALTHS = ("healthy", "starting", "unhealthy", "unknown")

# A release name becomes part of a container name and of file names: DNS-label-like, as Helm's.
_RELEASE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,51}[a-z0-9])?$")


class DriverError(LlmctlError):
    """An instance could not be started, inspected, stopped or removed."""


class DriverUnavailableError(DriverError):
    """The driver's backend (the Docker engine) cannot be reached."""


class PortInUseError(DriverError):
    """The host port asked for is already taken by another process or container."""


@dataclass(frozen=True)
class InstanceSpec:
    """How to run one release revision's model server."""

    release: str
    revision: int
    image: str  # docker: image tag (llmctl/NAME:VERSION); process: unused ("")
    image_id: str  # docker: the verified image ID (sha256 config digest); the engine's must match
    weights: Path | None  # the verified weights file on the host: process serves it; docker mounts it
    # read-only for a mounted-weights image (label dev.llmctl.model.weights.mounted=true), else ignores it
    weights_in_image: str  # e.g. /models/demo.gguf (the image label dev.llmctl.model.weights.path)
    weights_sha256: str  # sha256:<hex>, passed as --sha256: the runtime re-checks the file at start
    port: int = 0  # host port (0: pick a free one)
    host: str = "127.0.0.1"  # bind address on the host; 0.0.0.0 only when asked for
    threads: int | None = None
    ctx: int | None = None
    parallel: int | None = None
    repack: bool = True  # False: --no-repack (Q4_0 and Q8_0 matrices served in the file's layout)
    cpus: float | None = None  # docker: CPU quota; process: ignored
    memory: str | None = None  # docker: memory limit such as "4g"; process: ignored
    replicas: int | None = None  # swarm, kubernetes: pods or tasks (None: keep the count, 1 when new); others: 1
    image_digest: str = ""  # the verified manifest digest; kubernetes pods run <repository>@<digest>
    model: str = ""  # the model's name and version (kubernetes labels)
    model_version: str = ""
    # passed in the environment (LLMCTL_API_KEY), never on a command line; not in repr (logs)
    api_key: str | None = field(default=None, repr=False)

    def server_args(self) -> list[str]:
        """The optional `runtime serve` tuning flags (`--threads`, `--ctx`, `--parallel`, `--no-repack`)."""
        return tuning_args(threads=self.threads, ctx=self.ctx, parallel=self.parallel, repack=self.repack)


def tuning_args(*, threads: int | None, ctx: int | None, parallel: int | None, repack: bool) -> list[str]:
    """`runtime serve`'s tuning flags for the settings given (None, and repack=True: the server's default)."""
    args: list[str] = []
    for flag, value in (("--threads", threads), ("--ctx", ctx), ("--parallel", parallel)):
        if value is not None:
            args += [flag, str(value)]
    return args if repack else [*args, "--no-repack"]


@dataclass
class Instance:
    """One running (or stopped) model server as a driver sees it."""

    id: str  # docker: the container ID; process: "<release>-<revision>"
    release: str
    revision: int
    driver: str
    endpoint: str  # http://127.0.0.1:PORT
    state: str  # running | exited | restarting | created
    health: str  # healthy | starting | unhealthy | unknown
    started: str  # ISO 8601, UTC
    model_digest: str  # sha256:<hex> of the weights it serves
    replicas: int = 1  # swarm tasks or kubernetes pods it is meant to run (docker, process: 1)
    image: str = ""  # what it runs: docker, swarm the image ID; kubernetes repository@digest; process ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Driver(Protocol):
    """Runs model servers. Every method raises `DriverError` (or a subclass) on failure."""

    name: str

    def start(self, spec: InstanceSpec) -> Instance:
        """Create and start the instance; returns at once (see `wait_healthy`). `PortInUseError` if
        the port is taken; `DriverError` if the same release revision is already running."""
        ...

    def wait_healthy(self, instance: Instance, timeout: float) -> bool:
        """Poll GET {endpoint}/health until it answers 200 (True); False after `timeout` seconds,
        or as soon as the instance has exited (e.g. the runtime refused the weights)."""
        ...

    def health(self, instance: Instance) -> str:
        """healthy | starting | unhealthy | unknown (not running)."""
        ...

    def stop(self, instance: Instance, timeout: float = 30) -> None:
        """SIGTERM (the server drains and exits 0), then kill after `timeout` seconds; nothing to
        do if it is not running or already gone."""
        ...

    def remove(self, instance: Instance) -> None:
        """Forget a stopped instance (container, or state and log files); nothing to do if it is
        already gone; `DriverError` if it is running."""
        ...

    def list(self, release: str | None = None) -> list[Instance]:
        """llmctl's instances, all of them or those of one release."""
        ...

    def logs(self, instance: Instance, tail: int = 50) -> str:
        """The last `tail` lines the server (and its supervisor) wrote."""
        ...


def instance_name(release: str, revision: int) -> str:
    """The container name, also used for the process driver's file names (without the prefix)."""
    return f"llmctl-{release}-{revision}"


def check_spec(spec: InstanceSpec) -> None:
    """Reject what no driver can run: a release name unfit for container and file names, a bad
    revision, port or digest."""
    if not _RELEASE_NAME.match(spec.release):
        raise DriverError(
            f"release name {spec.release!r} is not valid: use at most 53 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    if isinstance(spec.revision, bool) or not isinstance(spec.revision, int) or spec.revision < 1:
        raise DriverError(f"revision {spec.revision!r} is not a positive integer")
    if not 0 <= spec.port <= 65535:
        raise DriverError(f"port {spec.port} is not between 1 and 65535")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", spec.weights_sha256):
        raise DriverError(f"weights digest {spec.weights_sha256!r} is not sha256:<64 hex digits>")
    try:
        ipaddress.ip_address(spec.host)
    except ValueError:
        raise DriverError(f"host {spec.host!r} is not an IP address") from None


def endpoint_url(host: str, port: int) -> str:
    """The URL a client on this machine uses: a wildcard bind address is reached on loopback."""
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        addr = ipaddress.ip_address("::1" if addr.version == 6 else "127.0.0.1")
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"http://{shown}:{port}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (another process may take it before
    the server binds it: the server then fails to start, and the driver reports it)."""
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """`PortInUseError` if `host:port` cannot be bound (a listener there, or on the wildcard address).
    SO_REUSEADDR as the server sets it: a closed connection in TIME_WAIT does not count."""
    with socket.socket(_family(host)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUseError(f"port {port} on {host} is already in use ({e.strerror}); choose another port") from e


START_PERIOD = 120.0  # seconds after a start during which an unanswered probe means "starting" (as the image's)


PROBE_TIMEOUT = 2.0  # seconds a /health probe waits for its answer


def healthy_by(endpoint: str, deadline: float) -> bool:
    """Whether GET {endpoint}/health answers 200 before `deadline` (a time.monotonic() value). A
    server that has bound its port but is still starting holds the request open, so the probe's
    wait ends at the deadline: with the full PROBE_TIMEOUT, a server that became healthy during
    that wait counted as healthy within a timeout shorter than it."""
    remaining = deadline - time.monotonic()
    return probe_health(endpoint, timeout=min(PROBE_TIMEOUT, max(remaining, 0.01))) == 200


def sleep_before(deadline: float, interval: float) -> None:
    """Sleep `interval` seconds, or less so as to wake by `deadline` (a time.monotonic() value): a
    poll for something that must happen within a timeout must not take its next look after it."""
    time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


def probe_health(endpoint: str, timeout: float = PROBE_TIMEOUT) -> int | None:
    """The status of GET {endpoint}/health; None if nothing answered. Never goes through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{endpoint}/health", timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):  # refused, reset, timed out, or a malformed answer
        return None


def health_from_probe(status: int | None, running_for: float) -> str:
    """A running server's health from its /health status: 200 healthy, 503 (loading) starting;
    no answer is "starting" during the first START_PERIOD seconds, "unhealthy" after."""
    if status == 200:
        return "healthy"
    if status == 503 or (status is None and running_for < START_PERIOD):
        return "starting"
    return "unhealthy"


def get_driver(name: str | None = None) -> Driver:
    """The driver called `name`; None: "docker" when the Docker engine answers a ping within a few
    seconds, else "process". `DriverUnavailableError` if "docker" or "swarm" is asked for and the
    engine does not answer (or, for "swarm", is not a swarm manager), or "kubernetes" is asked for and
    there is no kubeconfig; `DriverError` for an unknown name."""
    from manager.drivers.docker import DockerDriver, connect
    from manager.drivers.process import ProcessDriver

    if name == "process":
        return ProcessDriver()
    if name == "docker":
        return DockerDriver(connect())
    if name == "swarm":
        from manager.drivers.swarm import SwarmDriver

        return SwarmDriver(connect())
    if name == "kubernetes":
        from manager.drivers.kubernetes import KubernetesDriver

        return KubernetesDriver()
    if name is None:
        try:
            return DockerDriver(connect())
        except DriverUnavailableError:
            return ProcessDriver()
    raise DriverError(f"unknown driver {name!r}: use docker, process, swarm or kubernetes")
