"""`python -m runtime serve`: run the app with uvicorn, and shut down cleanly on SIGTERM / SIGINT.

On the first signal uvicorn stops accepting connections and the scheduler stops admitting work:
queued requests are cancelled at once, running ones get `shutdown_timeout` seconds to finish and
are then cancelled (their clients get an error event or a 503); once every response has ended the
process exits with 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from runtime.server.app import create_app
from runtime.server.loading import ModelLoad
from runtime.server.state import ServerConfig

log = logging.getLogger("llmctl.server")


class _Server(uvicorn.Server):
    """uvicorn's server, plus: the first exit signal also starts draining the scheduler, so running
    generations end (and their connections close) within the shutdown bound."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.on_exit_signal: list[Callable[[], None]] = []
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            log.info("received %s: finishing in-flight requests", signal.Signals(sig).name)
            for callback in self.on_exit_signal:
                callback()


@contextlib.contextmanager
def _signals_return() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it once it is done, for the previous handler to
    act on: with Python's defaults SIGTERM would then kill the process (exit 143) and SIGINT raise
    KeyboardInterrupt. A graceful stop exits 0, so the previous handlers do nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def run(
    model: str | os.PathLike[str] | ModelLoad,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    config: ServerConfig,
    log_level: str = "info",
    access_log: bool = True,
) -> int:
    """Serve `model` (a path, or a load already under way) until stopped; returns the process exit
    code (0, or 1 if the model failed to load or the address could not be bound)."""
    server: _Server | None = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(model, config=config, on_fatal=fatal)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        # a backstop: the scheduler ends every generation within shutdown_timeout already
        timeout_graceful_shutdown=math.ceil(config.shutdown_timeout) + 5,
        server_header=False,
    )
    server = _Server(uv_config)
    server.on_exit_signal.append(app.state.llm.begin_shutdown)
    auth = "required (Authorization: Bearer)" if config.api_key else "not required"
    log.info("llmctl runtime serving %s on http://%s:%d (API key %s)", app.state.llm.model_path, host, port, auth)
    with _signals_return():
        try:
            server.run()
        except SystemExit as e:  # uvicorn exits (with 3) when it cannot bind the address; it logged why
            if e.code in (0, None):
                return 0
            log.error("could not start the server on %s:%d", host, port)
            return 1
    if app.state.llm.load_error is not None:
        return 1
    return 0
