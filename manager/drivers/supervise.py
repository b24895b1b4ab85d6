"""`python -m manager.drivers.supervise STATE_FILE`: keep one model server process running.

Started detached by the process driver, with its standard output and error on the instance's log
file (the server child writes there too). It reads the server's command line (`argv`) from the
state file, runs it, and records in the same file (rewritten atomically) its own pid and start
time, the child's, and a `status`:

- a child that exits with 0 (it was stopped) or 1 (it refused to start: weights digest mismatch,
  port taken, unreadable model) is not restarted: the supervisor exits with the child's status;
- any other exit (a crash, a signal: 128 + signal number) is restarted after a backoff of
  0.5, 1, 2, 4, 8 s; after `MAX_RESTARTS` restarts within `WINDOW` seconds it gives up;
- SIGTERM and SIGINT are forwarded to the child, and the supervisor then exits with its status.

The child gets SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so a killed supervisor does not
leave a server behind; the API key reaches the child through the inherited environment only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any

from manager.drivers.procfs import read_json, start_time, utc_now, write_json_atomic

MAX_RESTARTS = 5
WINDOW = 60.0
NO_RESTART = (0, 1)  # 0: stopped; 1: the runtime refused to start (restarting cannot help)
PR_SET_PDEATHSIG = 1


def _log(message: str) -> None:
    print(f"{utc_now()} llmctl-supervise[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _exit_status(returncode: int) -> int:
    """A shell-style status: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent(parent: int) -> Any:
    """A preexec_fn: the child gets SIGTERM when the supervisor dies, however it dies."""

    def setup() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the driver's stop still kills the group
            return
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


class Supervisor:
    def __init__(self, state_path: Path) -> None:
        state = read_json(state_path)
        if state is None or not isinstance(state.get("argv"), list):
            raise SystemExit(f"llmctl-supervise: {state_path} is not an instance state file")
        self.path = state_path
        self.state = state
        self.argv: list[str] = [str(a) for a in state["argv"]]
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def _save(self, **changes: Any) -> None:
        self.state.update(changes)
        write_json_atomic(self.path, self.state)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def _spawn(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, close_fds=True, preexec_fn=_die_with_parent(os.getpid())
        )
        self.child = child
        if self.stopping:  # a signal arrived while it was being spawned
            child.send_signal(signal.SIGTERM)
        return child

    def _sleep(self, seconds: float) -> None:
        """Sleep, but return at once when asked to stop."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _finish(self, status: int) -> int:
        self._save(status="exited", exit_code=status, exited=utc_now())
        _log(f"exiting with status {status}")
        return status

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        me = os.getpid()
        self._save(supervisor={"pid": me, "start_time": start_time(me)}, status="starting", exit_code=None)
        restarts: deque[float] = deque()
        while True:
            try:
                child = self._spawn()
            except OSError as e:
                _log(f"cannot run the server: {e}")
                return self._finish(1)
            self._save(
                status="running",
                child={"pid": child.pid, "start_time": start_time(child.pid), "started": time.time()},
                restarts=len(restarts),
            )
            _log(f"server started (pid {child.pid})")
            status = _exit_status(child.wait())
            if self.stopping:
                _log(f"server stopped with status {status}")
                return self._finish(status)
            if status in NO_RESTART:
                why = "exited" if status == 0 else "refused to start or failed; not restarting"
                _log(f"server {why} (status {status})")
                return self._finish(status)
            now = time.monotonic()
            while restarts and now - restarts[0] > WINDOW:
                restarts.popleft()
            if len(restarts) >= MAX_RESTARTS:
                _log(f"server exited with status {status}: {MAX_RESTARTS} restarts in {WINDOW:.0f} s, giving up")
                return self._finish(status)
            delay = min(0.5 * 2 ** len(restarts), 8.0)
            _log(f"server exited with status {status}; restarting in {delay:g} s")
            self._save(status="restarting", child=None, last_exit_code=status)
            self._sleep(delay)
            if self.stopping:
                _log("stopped while waiting to restart")
                return self._finish(0)
            restarts.append(time.monotonic())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m manager.drivers.supervise STATE_FILE", file=sys.stderr)
        return 2
    return Supervisor(Path(args[0])).run()


if __name__ == "__main__":
    sys.exit(main())
