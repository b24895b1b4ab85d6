"""What one server holds: its options, the model (loaded in the background), the scheduler, the
metrics, and the shutdown sequence."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.engine import Model
from runtime.server.body import MAX_BODY_BYTES
from runtime.server.errors import APIError
from runtime.server.loading import ModelLoad, failure_message
from runtime.server.metrics import Metrics
from runtime.server.scheduler import Scheduler, Stats

log = logging.getLogger("llmctl.server")


@dataclass(frozen=True)
class ServerConfig:
    n_parallel: int = 4  # sequences decoded together
    max_queue: int = 64  # requests waiting for a slot before 429
    n_ctx: int | None = None  # per slot; None: the model's training context, at most 4096
    n_threads: int | None = None
    api_key: str | None = field(default=None, repr=False)  # never printed
    alias: str | None = None  # the model id in /v1/models and responses; default: the file's stem
    request_timeout: float | None = 600.0  # seconds a request may generate for
    shutdown_timeout: float = 5.0  # seconds in-flight requests get to finish on SIGTERM
    max_body_bytes: int = MAX_BODY_BYTES
    weights_sha256: str | None = None  # checked before loading (runtime/verify.py); None: not pinned
    rehash: bool = False  # hash the weights even when a check record exists

    def __post_init__(self) -> None:
        if self.n_parallel < 1:
            raise ValueError("n_parallel must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")


class ServerState:
    """Shared by every handler as `request.app.state.llm`."""

    def __init__(
        self,
        source: str | os.PathLike[str] | Model | ModelLoad,
        config: ServerConfig,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._source = source
        self.model_path = source.path if isinstance(source, (Model, ModelLoad)) else Path(source)
        self.alias = config.alias or self.model_path.stem
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.shutting_down = False
        self.created = int(time.time())
        self._on_fatal = on_fatal
        self._stopper: threading.Thread | None = None
        self._lock = threading.RLock()  # begin_shutdown may run in a signal handler on the loop's thread
        self.metrics = Metrics(self._gauges)

    # --- lifecycle ---

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin serving: a Model given to create_app is ready now; a path is loaded on a daemon
        thread (so /health can answer 503 meanwhile), and a ModelLoad already under way (started
        by `serve` before it imported the HTTP stack) is attached to."""
        if isinstance(self._source, Model):
            self._ready(self._source, self._scheduler_for(self._source), 0.0)
            return
        if isinstance(self._source, ModelLoad):
            load = self._source
        else:
            cfg = self.config
            log.info("loading %s", self.model_path)
            load = ModelLoad(
                self.model_path,
                n_threads=cfg.n_threads,
                n_ctx=cfg.n_ctx,
                weights_sha256=cfg.weights_sha256,
                rehash=cfg.rehash,
            )

        def ended(load: ModelLoad) -> None:
            model, scheduler, error = load.model, None, load.error or "unknown error"
            if model is not None:
                try:
                    scheduler = self._scheduler_for(model)
                except Exception as e:  # MemoryError for the slots' caches...: the server cannot serve
                    error = failure_message(e)
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is gone (shutting down)
                if model is None or scheduler is None:
                    loop.call_soon_threadsafe(self._failed, error)
                else:
                    loop.call_soon_threadsafe(self._ready, model, scheduler, load.seconds)

        load.when_ended(ended)

    def _scheduler_for(self, model: Model) -> Scheduler:
        return Scheduler(model, n_parallel=self.config.n_parallel, max_queue=self.config.max_queue)

    def _ready(self, model: Model, scheduler: Scheduler, seconds: float) -> None:
        with self._lock:
            if self.shutting_down:
                return
            scheduler.start()
            self.model, self.scheduler, self.load_seconds = model, scheduler, seconds
        log.info(
            "model ready in %.1f s: %s, n_ctx %d per slot, %d slots, %d threads",
            seconds,
            self.model_path.name,
            model.n_ctx,
            self.config.n_parallel,
            model.n_threads,
        )

    def _failed(self, message: str) -> None:
        self.load_error = message
        log.error("cannot load the model: %s", message)
        if self._on_fatal is not None:
            self._on_fatal()

    def begin_shutdown(self) -> None:
        """Stop admitting requests; running ones get config.shutdown_timeout seconds, then are
        cancelled. Idempotent and safe from a signal handler (the waiting happens on a thread)."""
        with self._lock:
            self.shutting_down = True
            if self._stopper is not None or self.scheduler is None:
                return
            scheduler, timeout = self.scheduler, self.config.shutdown_timeout
            self._stopper = threading.Thread(
                target=scheduler.stop, args=(timeout,), name="llmctl-shutdown", daemon=True
            )
            self._stopper.start()

    async def shutdown(self) -> None:
        self.begin_shutdown()
        stopper = self._stopper
        if stopper is None:
            return
        deadline = time.monotonic() + 2 * self.config.shutdown_timeout + 5  # Scheduler.stop's own bound
        while stopper.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # --- for handlers ---

    def require_model(self) -> tuple[Model, Scheduler]:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.model is None or self.scheduler is None:
            if self.load_error is not None:
                raise APIError(500, f"the model failed to load: {self.load_error}", code="model_load_failed")
            raise APIError(
                503, "the model is still loading; retry shortly", code="model_loading", headers={"Retry-After": "1"}
            )
        return self.model, self.scheduler

    def stats(self) -> Stats:
        if self.scheduler is None:
            return Stats(0, 0, self.config.n_parallel)
        return self.scheduler.stats()

    def _gauges(self) -> dict[str, tuple[str, float]]:
        s = self.stats()
        repacking = self.model.transformer.repacking if self.model is not None else None
        repacked, to_repack = (repacking.installed, repacking.total) if repacking is not None else (0, 0)
        return {
            "llmctl_queue_depth": ("Requests waiting for a free slot", s.queue_depth),
            "llmctl_busy_slots": ("Slots generating or prefilling a request", s.busy_slots),
            "llmctl_slots": ("Slots (sequences decoded together)", s.n_slots),
            "llmctl_model_loaded": ("1 once the model is loaded and serving", float(self.scheduler is not None)),
            "llmctl_matrices_to_repack": ("Weight matrices the model repacks for faster kernels", float(to_repack)),
            "llmctl_matrices_repacked": ("Of those, the matrices that serve repacked now", float(repacked)),
        }
