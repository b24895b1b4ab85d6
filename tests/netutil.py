"""Loopback helpers shared by the tests that start servers and containers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_health(url: str, timeout: float, *, alive: Callable[[], bool] = lambda: True) -> int | None:
    """Poll `url`/health until it answers 200, `alive()` turns false, or `timeout` seconds pass;
    returns the last status code (None if nothing answered)."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline and alive():
        try:
            status = httpx.get(f"{url}/health", timeout=2).status_code
        except httpx.HTTPError:
            status = None
        if status == 200:
            break
        time.sleep(0.2)
    return status
