"""Continuous batching: one engine thread decodes up to N sequences together.

Requests wait in a bounded queue; each admitted request gets a slot (its own KV cache). Every
step the engine prefills one chunk of a newly admitted prompt (so a long prompt never stalls the
others for long), then runs one batched forward pass over the last token of every decoding slot
(weights are read once per step for all of them) and samples each slot's next token. A slot
remembers the tokens in its cache when it finishes, so the next request sharing a prefix (an
editor resending the file on every keystroke) reuses that part instead of recomputing it.

The HTTP layer talks to it only through `Scheduler.submit`, `Handle` and `Scheduler.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.engine import Model
from runtime.errors import ContextOverflowError, ModelError
from runtime.generate import StopMatcher
from runtime.kv_cache import KVCache
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import StreamDecoder

PREFILL_CHUNK = 256  # prompt tokens per engine step


class QueueFullError(ModelError):
    """Every slot is busy and the waiting queue is full: retry later."""


@dataclass(frozen=True)
class Request:
    """One generation as the engine sees it."""

    prompt_ids: list[int]
    max_tokens: int | None  # None: until EOS or the context is full
    sampling: SamplingParams
    stop: Sequence[str] = ()
    n_probs: int = 0  # also report the top-n alternatives' log-probabilities of each token
    time_limit: float | None = None  # seconds from admission; then it ends with finish_reason "length"
    reuse_prefix: bool = True  # start from a slot's cached tokens when they share a prefix


@dataclass
class TokenEvent:
    """A generated token and the text it completes (may be "" while a character or a possible
    stop string is held back)."""

    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinalEvent:
    """The end of a generation."""

    finish_reason: str  # "stop", "length" or "cancelled"
    text: str  # any text released only at the end
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from a slot's cache
    time_to_first_token: float | None
    error: str | None = None  # set when the engine failed on this request


Event = TokenEvent | FinalEvent


class Handle:
    """A submitted request: iterate its events; cancel() (e.g. when the client disconnects)
    frees its slot at the next step."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()

    def _emit(self, event: Event) -> None:  # engine thread
        with contextlib.suppress(RuntimeError):  # the client's event loop is gone: nobody to tell
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, FinalEvent):
                return


@dataclass
class _Slot:
    cache: KVCache
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values the cache holds
    handle: Handle | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    sampler: Sampler | None = None
    history: list[int] = field(default_factory=list)
    decoder: StreamDecoder | None = None
    stops: StopMatcher | None = None
    generated: int = 0
    reused: int = 0
    started: float = 0.0
    first_token_at: float | None = None
    last_used: float = 0.0  # when its last request ended: the least recently used slot is reused first


@dataclass(frozen=True)
class Stats:
    queue_depth: int
    busy_slots: int
    n_slots: int


class Scheduler:
    def __init__(self, model: Model, *, n_parallel: int = 4, max_queue: int = 64) -> None:
        if n_parallel < 1:
            raise ValueError("n_parallel must be at least 1")
        self.model = model
        self.n_ctx = model.n_ctx
        self.max_queue = max_queue
        self.slots = [_Slot(KVCache(model.config, model.n_ctx)) for _ in range(n_parallel)]
        self._queue: deque[Handle] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llmctl-engine", daemon=True)

    # --- the HTTP side ---

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request. Raises ContextOverflowError if it cannot fit a slot's context and
        QueueFullError when the waiting queue is full."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ContextOverflowError("the prompt is empty: give at least one token of text")
        if n >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {n} tokens but the context window holds {self.n_ctx}; shorten the prompt"
            )
        if request.max_tokens is not None and n + request.max_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"prompt ({n} tokens) + max_tokens ({request.max_tokens}) exceeds the context window of "
                f"{self.n_ctx} tokens; lower max_tokens"
            )
        handle = Handle(request, loop or asyncio.get_running_loop())
        with self._cv:
            self._drop_cancelled_locked()
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"all {len(self.slots)} slots are busy and {self.max_queue} requests are waiting")
            self._queue.append(handle)
            self._cv.notify()
        return handle

    def stats(self) -> Stats:
        with self._cv:
            self._drop_cancelled_locked()
            return Stats(len(self._queue), sum(s.handle is not None for s in self.slots), len(self.slots))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop admitting; cancel what is still queued; give running requests up to `timeout`
        seconds to finish, then cancel them; wait for the engine thread."""
        with self._cv:
            self._stopping = True
            while self._queue:
                self._queue.popleft()._emit(FinalEvent("cancelled", "", 0, 0, 0, None, error="server shutting down"))
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(s.handle is not None for s in self.slots):
            time.sleep(0.05)
        for s in self.slots:
            if s.handle is not None:
                s.handle.cancel()
        with self._cv:
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=max(1.0, timeout))

    def _drop_cancelled_locked(self) -> None:
        """Requests whose clients went away while waiting give their queue place back."""
        for handle in [h for h in self._queue if h.cancelled.is_set()]:
            self._queue.remove(handle)
            handle._emit(FinalEvent("cancelled", "", len(handle.request.prompt_ids), 0, 0, None))

    # --- the engine thread ---

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._queue and all(s.handle is None for s in self.slots):
                    self._cv.wait()
                if self._stopping and all(s.handle is None for s in self.slots):
                    return
                self._admit_locked()
            try:
                self._step()
            except Exception as e:  # a bug must fail the requests in flight, not kill the server
                for s in self.slots:
                    if s.handle is not None:
                        self._finish(s, "stop", error=f"internal error: {type(e).__name__}: {e}")
                        s.cached = []

    def _admit_locked(self) -> None:
        free = [s for s in self.slots if s.handle is None]
        while free and self._queue:
            handle = self._queue.popleft()
            if handle.cancelled.is_set():
                handle._emit(FinalEvent("cancelled", "", len(handle.request.prompt_ids), 0, 0, None))
                continue
            prompt = handle.request.prompt_ids
            # the free slot whose cache shares the longest prefix with this prompt; among equals the
            # least recently used, so one unrelated request does not evict everyone's shared prefix
            best = max(free, key=lambda s: (_common_prefix(s.cached, prompt), -s.last_used))
            free.remove(best)
            shared = _common_prefix(best.cached, prompt) if handle.request.reuse_prefix else 0
            reuse = min(shared, len(prompt) - 1)  # recompute >= 1 token for logits
            self._begin(best, handle, reuse)

    def _begin(self, slot: _Slot, handle: Handle, reuse: int) -> None:
        req = handle.request
        slot.handle = handle
        slot.cache.n_past = reuse
        slot.cached = list(req.prompt_ids[:reuse])
        slot.pending = list(req.prompt_ids[reuse:])
        slot.sampler = Sampler(req.sampling)
        slot.history = list(req.prompt_ids)
        slot.decoder = self.model.tokenizer.stream_decoder()
        slot.stops = StopMatcher(req.stop)
        slot.generated = 0
        slot.reused = reuse
        slot.started = time.monotonic()
        slot.first_token_at = None

    def _step(self) -> None:
        tr = self.model.transformer
        # 1. one prefill chunk, for the first slot that still has prompt to process
        for s in self.slots:
            if s.handle is not None and s.pending:
                if self._ended_early(s):
                    break
                chunk, s.pending = s.pending[:PREFILL_CHUNK], s.pending[PREFILL_CHUNK:]
                logits = tr.forward(np.asarray(chunk, dtype=np.int64), s.cache)
                s.cached += chunk
                if not s.pending:
                    self._take(s, logits[-1])
                break
        # 2. one batched decode step for every slot that has a token to feed
        ready = [s for s in self.slots if s.handle is not None and not s.pending]
        ready = [s for s in ready if not self._ended_early(s)]
        if not ready:
            return
        tokens = [s.history[-1] for s in ready]
        logits = tr.forward_batch(
            [(s.cache, np.asarray([t], dtype=np.int64)) for s, t in zip(ready, tokens, strict=True)]
        )
        for s, t, row in zip(ready, tokens, logits, strict=True):
            s.cached.append(t)
            self._take(s, row)

    def _ended_early(self, s: _Slot) -> bool:
        """Cancelled or over its time limit: finish the request and free the slot."""
        assert s.handle is not None
        if s.handle.cancelled.is_set():
            self._finish(s, "cancelled")
            return True
        limit = s.handle.request.time_limit
        if limit is not None and time.monotonic() - s.started > limit:
            self._finish(s, "length")
            return True
        return False

    def _take(self, s: _Slot, logits: np.ndarray) -> None:
        """Sample the next token of slot s from `logits` and emit it, or finish."""
        assert s.handle is not None and s.sampler is not None and s.decoder is not None and s.stops is not None
        req = s.handle.request
        budget = self.n_ctx - len(req.prompt_ids) if req.max_tokens is None else req.max_tokens
        if s.generated >= budget:  # max_tokens=0: the prompt is processed (and cached), nothing generated
            self._finish(s, "length")
            return
        token = s.sampler(logits, s.history)
        if s.first_token_at is None:
            s.first_token_at = time.monotonic()
        if token in self.model.tokenizer.eog_ids:
            self._finish(s, "stop")
            return
        s.history.append(token)
        s.generated += 1
        logprob, top = _logprobs(logits, token, req.n_probs) if req.n_probs > 0 else (None, None)
        text, hit = s.stops.feed(s.decoder.push(token))
        s.handle._emit(TokenEvent(token, text, logprob, top))
        if hit:
            self._finish(s, "stop", flush=False)
            return
        if s.generated >= budget or len(s.history) >= self.n_ctx:
            self._finish(s, "length")

    def _finish(self, s: _Slot, reason: str, *, flush: bool = True, error: str | None = None) -> None:
        assert s.handle is not None
        tail = ""
        if flush and s.decoder is not None and s.stops is not None and error is None:
            tail, hit = s.stops.feed(s.decoder.flush())
            tail += "" if hit else s.stops.flush()
        handle, prompt = s.handle, s.handle.request.prompt_ids
        ttft = None if s.first_token_at is None else s.first_token_at - handle.submitted
        s.pending = []  # a prompt cut short: only what was prefilled is in the cache
        s.handle = None  # free before telling the client, so a finished request never holds a slot
        s.sampler = s.decoder = s.stops = None
        s.last_used = time.monotonic()
        handle._emit(FinalEvent(reason, tail, len(prompt), s.generated, s.reused, ttft, error))
        with self._cv:
            self._cv.notify()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    top = np.argsort(-x, kind="stable")[:n]
    return float(x[token] - lse), [(int(i), float(x[i] - lse)) for i in top]
