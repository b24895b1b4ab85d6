"""One generation on behalf of an HTTP handler: submit it to the scheduler, follow its events,
record metrics, and cancel it when the client goes away.

Non-streaming handlers call `collect` (which polls for a disconnect while waiting); streaming
handlers return an `EventStream`, whose end (finished, failed, cancelled or disconnected) always
cancels the request, so its slot is freed at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from runtime.errors import ContextOverflowError
from runtime.sampling import SamplingParams
from runtime.server.errors import APIError, context_error
from runtime.server.scheduler import Event, FinalEvent, Handle, QueueFullError, TokenEvent
from runtime.server.scheduler import Request as EngineRequest
from runtime.server.state import ServerState

DISCONNECT_POLL = 0.1  # seconds between checks that a non-streaming client is still there


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int | None  # None: until end of text or the context is full
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    n_probs: int = 0
    time_limit: float | None = None  # seconds; the server's --timeout applies too
    clamp_to_context: bool = False  # llama.cpp: a max_tokens beyond the context stops there instead of a 400
    reuse_prefix: bool = True  # llama.cpp's cache_prompt


@dataclass
class Outcome:
    tokens: list[TokenEvent]
    text: str
    final: FinalEvent
    submitted: float  # time.monotonic()
    first_token_at: float | None
    ended: float


class Run:
    """A submitted generation."""

    def __init__(self, state: ServerState, job: Job, handle: Handle) -> None:
        self.state = state
        self.job = job
        self.handle = handle
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.client_gone = False
        self.finished = False  # its FinalEvent was seen (and counted)
        self._tokens_seen = 0

    @classmethod
    def start(cls, state: ServerState, job: Job) -> Run:
        """Submit `job`; APIError 400 (context), 429 (queue full) or 503 (loading, shutting down)."""
        model, scheduler = state.require_model()
        n, n_ctx = len(job.prompt_ids), model.n_ctx
        if n == 0:
            raise APIError(400, "the prompt is empty: give at least one token of text", param="prompt")
        if n >= n_ctx:
            raise context_error(f"the prompt has {n} tokens but the context window holds {n_ctx}; shorten the prompt")
        max_tokens = job.max_tokens
        if job.clamp_to_context and max_tokens is not None and n + max_tokens > n_ctx:
            max_tokens = None  # until the context is full
        limits = [t for t in (job.time_limit, state.config.request_timeout) if t]
        request = EngineRequest(
            prompt_ids=job.prompt_ids,
            max_tokens=max_tokens,
            sampling=job.sampling,
            stop=tuple(job.stop),
            n_probs=job.n_probs,
            time_limit=min(limits) if limits else None,
            reuse_prefix=job.reuse_prefix,
        )
        try:
            handle = scheduler.submit(request, asyncio.get_running_loop())
        except ContextOverflowError as e:
            raise context_error(str(e), param="max_tokens") from None
        except QueueFullError as e:
            if state.shutting_down:
                raise APIError(503, "the server is shutting down", code="shutting_down") from None
            raise APIError(429, f"{e}; retry later", code="queue_full", headers={"Retry-After": "1"}) from None
        return cls(state, job, handle)

    def cancel(self) -> None:
        """Free the slot at the engine's next step. When nobody will read the end of this run (a
        stream whose client left), count it here as cancelled."""
        if self.finished:
            return
        self.handle.cancel()
        self.finished = True
        m = self.state.metrics
        m.prompt_tokens.inc(len(self.job.prompt_ids))
        m.generated_tokens.inc(self._tokens_seen)
        m.finished.labels("cancelled").inc()

    async def events(self) -> AsyncIterator[Event]:
        m = self.state.metrics
        last: float | None = None
        async for event in self.handle.events():
            now = time.monotonic()
            if self.finished:  # counted as cancelled already
                yield event
                continue
            if isinstance(event, TokenEvent):
                self._tokens_seen += 1
                if last is None:
                    self.first_token_at = now
                else:
                    m.per_token.observe(now - last)
                last = now
            else:
                self.finished = True
                m.prompt_tokens.inc(event.prompt_tokens)
                m.cached_tokens.inc(event.cached_tokens)
                m.generated_tokens.inc(event.completion_tokens)
                failed = event.error is not None and event.finish_reason != "cancelled"
                m.finished.labels("error" if failed else event.finish_reason).inc()
                if event.time_to_first_token is not None:
                    m.ttft.observe(event.time_to_first_token)
            yield event

    def failure(self, final: FinalEvent) -> APIError | None:
        """The error a generation that ended this way answers with, if it did not complete."""
        if final.finish_reason == "cancelled":
            if self.client_gone:
                return APIError(499, "the client closed the connection")
            if self.state.shutting_down or final.error:
                return APIError(503, "the server is shutting down; the request was cancelled", code="shutting_down")
            return APIError(503, "the request was cancelled", code="cancelled")
        if final.error is not None:
            return APIError(500, f"generation failed: {final.error}", code="generation_failed")
        return None


async def _watch_disconnect(request: Request, run: Run) -> None:
    while True:
        await asyncio.sleep(DISCONNECT_POLL)
        if await request.is_disconnected():
            run.client_gone = True
            run.cancel()
            return


async def collect(run: Run, request: Request) -> Outcome:
    """Wait for the whole generation; cancel it if the client disconnects. APIError if it did not complete."""
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    tokens: list[TokenEvent] = []
    pieces: list[str] = []
    final: FinalEvent | None = None
    try:
        async for event in run.events():
            if isinstance(event, TokenEvent):
                tokens.append(event)
                pieces.append(event.text)
            else:
                pieces.append(event.text)
                final = event
    finally:
        watcher.cancel()
        run.cancel()
    assert final is not None
    error = run.failure(final)
    if error is not None:
        raise error
    return Outcome(tokens, "".join(pieces), final, run.submitted, run.first_token_at, time.monotonic())


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose end always cancels the generation behind them: when the client
    disconnects Starlette cancels the body iterator, and this `finally` frees the slot."""

    def __init__(self, content: AsyncIterator[str], run: Run) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.client_gone = True  # if it has not finished yet, nobody is reading it any more
            self.run.cancel()


def finite(x: float | None) -> float | None:
    """JSON has no infinities: a log-probability of -inf (a masked token) is reported as null."""
    return x if x is not None and math.isfinite(x) else None
