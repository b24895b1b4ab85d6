"""The server's model load, on a daemon thread that can start before the HTTP stack is imported.

`python -m runtime serve` starts the load first and imports Starlette and uvicorn while the file is
mapped and pre-faulted (the page faults run without the GIL), so that the two overlap instead of
following each other. The file is parsed once: its header is checked first, and `wait_checked`
lets the command refuse a file that is no model before it binds the port. The server attaches
to the load when it starts; a load that already ended reports at once. Nothing here imports the
HTTP stack.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from runtime.config import ModelConfig
from runtime.engine import Model
from runtime.errors import ModelError
from runtime.gguf import GGUFFile, read_gguf
from runtime.verify import verify_weights

log = logging.getLogger("llmctl.server")


def failure_message(e: Exception) -> str:
    """What a failed load reports: a ModelError's own one-line message, otherwise the type too
    (OSError, MemoryError...)."""
    return str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"


class ModelLoad:
    """Loads `path` on a daemon thread from construction on: parses the file and checks its
    header (model config), checks the pinned weights digest (if any), pre-faults the mapping,
    then builds the Model. Exactly one of `model` and `error` is set once it ends."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_threads: int | None = None,
        n_ctx: int | None = None,
        weights_sha256: str | None = None,
        rehash: bool = False,
        repack: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.model: Model | None = None
        self.error: str | None = None
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._checked = threading.Event()
        self._header_error: str | None = None
        self._ended = False
        self._on_end: list[Callable[[ModelLoad], None]] = []
        # daemon: a SIGTERM during a long load is not held up by it
        options = (n_threads, n_ctx, weights_sha256, rehash, repack)
        threading.Thread(target=self._run, args=options, name="llmctl-load", daemon=True).start()

    def _run(
        self, n_threads: int | None, n_ctx: int | None, sha256: str | None, rehash: bool, repack: bool | None
    ) -> None:
        t0 = time.monotonic()
        f: GGUFFile | None = None
        try:
            try:
                f = read_gguf(self.path)
                ModelConfig.from_gguf(f)
            except Exception as e:
                self._header_error = failure_message(e)
                raise
            finally:
                self._checked.set()
            if sha256 is not None:
                hashed = not verify_weights(self.path, sha256, rehash=rehash)
                log.info("weights match sha256:%s (%s)", sha256, "hashed" if hashed else "check record")
            f.populate()
            self.model = Model.open(f, n_threads=n_threads, n_ctx=n_ctx, repack=repack)
        except Exception as e:  # ModelError, OSError, MemoryError...: the server cannot serve
            self.error = failure_message(e)
            if f is not None:
                f.close()
        self.seconds = time.monotonic() - t0
        with self._lock:
            self._ended = True
            callbacks, self._on_end = self._on_end, []
        for callback in callbacks:
            callback(self)

    def wait_checked(self) -> str | None:
        """Wait until the file is parsed and its header checked (quick: nothing is hashed or
        faulted in yet); the one-line error if the file is no usable model, else None."""
        self._checked.wait()
        return self._header_error

    def when_ended(self, callback: Callable[[ModelLoad], None]) -> None:
        """Call `callback(self)` once the load has ended: at once if it already has, otherwise
        on the loading thread."""
        with self._lock:
            if not self._ended:
                self._on_end.append(callback)
                return
        callback(self)
