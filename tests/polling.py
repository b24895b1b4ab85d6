"""Waiting for another thread or process to bring a condition about."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(condition: Callable[[], bool], timeout: float, every: float) -> bool:
    """Poll `condition` every `every` seconds until it holds (True) or `timeout` seconds pass
    (then one last look decides)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()
