"""The process driver: the model server as a supervised local process, no container engine needed.

`start` spawns, detached (its own session, stdin from /dev/null), `python -m manager.drivers.supervise
STATE_FILE`, which runs `python -m runtime serve` and restarts it after a crash (see supervise.py).
Each instance has two files under `data_dir()/instances/`: `<release>-<revision>.json`, its state
(written by the driver before the spawn, then only by the supervisor, always atomically), and
`<release>-<revision>.log`, the supervisor's and the server's output.

Isolation is the user's own: no read-only root, no capability drop, and `InstanceSpec.cpus` and
`.memory` are ignored (use the docker driver for limits). The API key is passed in the environment
(`LLMCTL_API_KEY`), never on a command line and never in the state file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from manager import paths
from manager.drivers.base import (
    DriverError,
    Instance,
    InstanceSpec,
    check_port_free,
    check_spec,
    endpoint_url,
    free_port,
    health_from_probe,
    healthy_by,
    probe_health,
    sleep_before,
)
from manager.drivers.procfs import alive, read_json, tail_lines, utc_now, write_json_atomic

SPAWN_TIMEOUT = 15.0  # seconds for the supervisor to start and record the server's pid

# Supervisors this process spawned: polled so that an exited one is reaped, not left a zombie
# (the CLI exits long before its instances do; a long-lived caller such as the tests does not).
_spawned: dict[int, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    for pid, proc in list(_spawned.items()):
        if proc.poll() is not None:
            del _spawned[pid]


def _pid_of(state: dict[str, Any], key: str) -> tuple[int | None, int | None]:
    entry = state.get(key)
    if not isinstance(entry, dict):
        return None, None
    return entry.get("pid"), entry.get("start_time")


class ProcessDriver:
    """Model servers as local processes under a small supervisor."""

    name = "process"

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir if state_dir is not None else paths.data_dir() / "instances"

    # --- files -----------------------------------------------------------------------------------

    def _stem(self, release: str, revision: int) -> str:
        return f"{release}-{revision}"

    def state_path(self, release: str, revision: int) -> Path:
        return self.state_dir / f"{self._stem(release, revision)}.json"

    def log_path(self, release: str, revision: int) -> Path:
        return self.state_dir / f"{self._stem(release, revision)}.log"

    def _state_of(self, instance: Instance) -> dict[str, Any] | None:
        return read_json(self.state_path(instance.release, instance.revision))

    # --- state -----------------------------------------------------------------------------------

    def _supervisor_alive(self, state: dict[str, Any]) -> bool:
        _reap()
        return alive(*_pid_of(state, "supervisor"))

    def _run_state(self, state: dict[str, Any]) -> str:
        if not self._supervisor_alive(state):
            return "exited"
        if alive(*_pid_of(state, "child")):
            return "running"
        return "restarting" if state.get("status") == "restarting" else "created"

    def _health(self, state: dict[str, Any], run_state: str) -> str:
        if run_state != "running":
            return "unknown"
        child = state.get("child") or {}
        started = float(child.get("started") or 0)
        return health_from_probe(probe_health(state["endpoint"]), time.time() - started)

    def _instance(self, state: dict[str, Any], *, with_health: bool = True) -> Instance:
        run_state = self._run_state(state)
        return Instance(
            id=self._stem(state["release"], state["revision"]),
            release=state["release"],
            revision=int(state["revision"]),
            driver=self.name,
            endpoint=state["endpoint"],
            state=run_state,
            health=self._health(state, run_state) if with_health else "unknown",
            started=state.get("started", ""),
            model_digest=state.get("model_digest", ""),
        )

    # --- the interface ---------------------------------------------------------------------------

    def start(self, spec: InstanceSpec) -> Instance:
        check_spec(spec)
        if spec.weights is None:
            raise DriverError("the process driver serves a weights file from the host: the spec names none")
        weights = spec.weights.resolve()
        if not weights.is_file():
            raise DriverError(f"weights file {weights} does not exist")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.state_path(spec.release, spec.revision)
        old = read_json(state_path)
        if old is not None and self._supervisor_alive(old):
            raise DriverError(
                f"{spec.release} revision {spec.revision} is already running "
                f"(supervisor pid {old['supervisor']['pid']}); stop it first"
            )
        if spec.port:
            check_port_free(spec.host, spec.port)
            port = spec.port
        else:
            port = free_port(spec.host)
        argv = [sys.executable, "-m", "runtime", "serve", "-m", str(weights), "--host", spec.host]
        argv += ["--port", str(port), "--sha256", spec.weights_sha256, *spec.server_args()]
        state: dict[str, Any] = {
            "driver": self.name,
            "release": spec.release,
            "revision": spec.revision,
            "host": spec.host,
            "port": port,
            "endpoint": endpoint_url(spec.host, port),
            "weights": str(weights),
            "model_digest": spec.weights_sha256,
            "argv": argv,
            "log": str(self.log_path(spec.release, spec.revision)),
            "started": utc_now(),
            "status": "created",
        }
        write_json_atomic(state_path, state)

        env = dict(os.environ)
        env.pop("LLMCTL_WEIGHTS_SHA256", None)  # --sha256 is the pin
        env.pop("LLMCTL_API_KEY", None)  # no key unless the spec has one
        if spec.api_key:
            env["LLMCTL_API_KEY"] = spec.api_key
        with open(self.log_path(spec.release, spec.revision), "ab") as log:
            log.write(f"--- {utc_now()} llmctl: starting {spec.release} revision {spec.revision}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "manager.drivers.supervise", str(state_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd="/",
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                raise DriverError(f"cannot start the supervisor: {e}") from e
        _spawned[proc.pid] = proc
        return self._wait_spawned(spec, proc, state_path)

    def _wait_spawned(self, spec: InstanceSpec, proc: subprocess.Popen[bytes], state_path: Path) -> Instance:
        """Wait (briefly) until the supervisor has recorded itself and the server's pid."""
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while True:
            state = read_json(state_path) or {}
            if state.get("supervisor") and (state.get("child") or state.get("status") == "exited"):
                return self._instance(state, with_health=False)
            code = proc.poll()
            if code is not None and not state.get("supervisor"):
                tail = tail_lines(self.log_path(spec.release, spec.revision), 10).strip()
                raise DriverError(
                    f"the supervisor of {spec.release} revision {spec.revision} exited with {code}: {tail}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise DriverError(
                    f"the supervisor of {spec.release} revision {spec.revision} did not start within "
                    f"{SPAWN_TIMEOUT:g} s; see {self.log_path(spec.release, spec.revision)}"
                )
            time.sleep(0.05)

    def wait_healthy(self, instance: Instance, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if healthy_by(instance.endpoint, deadline):
                return True
            state = self._state_of(instance)
            if state is None or self._run_state(state) == "exited":
                return False
            if time.monotonic() >= deadline:
                return False
            sleep_before(deadline, 0.2)

    def health(self, instance: Instance) -> str:
        state = self._state_of(instance)
        if state is None:
            return "unknown"
        return self._health(state, self._run_state(state))

    def stop(self, instance: Instance, timeout: float = 30) -> None:
        state = self._state_of(instance)
        if state is None:
            return  # already removed
        supervisor = _pid_of(state, "supervisor")
        child = _pid_of(state, "child")
        if alive(*supervisor):
            target = supervisor  # it forwards SIGTERM to the server and exits with its status
        elif alive(*child):
            target = child  # an orphaned server (the supervisor was killed)
        else:
            return
        pid = target[0]
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap()
            if not alive(*target) and not alive(*child):
                return
            time.sleep(0.1)
        # Still there: kill the supervisor's process group (the server is in it), and the server.
        if alive(*supervisor):
            try:
                os.killpg(supervisor[0] or 0, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if alive(*child):
            os.kill(child[0] or 0, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and (alive(*supervisor) or alive(*child)):
            _reap()
            time.sleep(0.05)

    def remove(self, instance: Instance) -> None:
        state = self._state_of(instance)
        if state is not None and (self._supervisor_alive(state) or alive(*_pid_of(state, "child"))):
            raise DriverError(f"instance {instance.id} is running; stop it first")
        self.state_path(instance.release, instance.revision).unlink(missing_ok=True)
        self.log_path(instance.release, instance.revision).unlink(missing_ok=True)

    def list(self, release: str | None = None) -> list[Instance]:
        if not self.state_dir.is_dir():
            return []
        found = []
        for path in sorted(self.state_dir.glob("*.json")):
            if path.name.startswith("."):
                continue  # a write in progress
            state = read_json(path)
            if state is None or state.get("driver") != self.name or "endpoint" not in state:
                continue
            if release is not None and state.get("release") != release:
                continue
            found.append(self._instance(state))
        return found

    def logs(self, instance: Instance, tail: int = 50) -> str:
        return tail_lines(self.log_path(instance.release, instance.revision), tail)
