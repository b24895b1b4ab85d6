"""The continuous-batching scheduler behind the server: batched decoding gives the same tokens as
one request alone, prefixes are reused, and cancellation, limits and shutdown free the slots."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime import Model
from runtime.errors import ContextOverflowError
from runtime.kv_cache import KVCache
from runtime.sampling import SamplingParams
from runtime.server.scheduler import FinalEvent, QueueFullError, Request, Scheduler, TokenEvent
from runtime.testing.make_model import make_model

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    path = make_model(tmp_path_factory.mktemp("sched") / "m.gguf", preset="small", wtype="q8_0", n_layer=2, seed=1)
    with Model.load(path, n_ctx=512) as m:
        yield m


async def _collect(sch: Scheduler, req: Request) -> tuple[list[int], str, FinalEvent]:
    handle = sch.submit(req)
    tokens: list[int] = []
    text = ""
    async for ev in handle.events():
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token)
            text += ev.text
        else:
            return tokens, text + ev.text, ev
    raise AssertionError("no final event")


def _prompts(model: Model, n: int) -> list[list[int]]:
    return [model.tokenize(f"def handler_{i}(request):\n    if request.{'x' * i}:\n        return") for i in range(n)]


def test_forward_batch_equals_separate_forwards(model: Model) -> None:
    tr = model.transformer
    prompts = _prompts(model, 3)
    caches = [KVCache(model.config, 64) for _ in prompts]
    for c, p in zip(caches, prompts, strict=True):
        tr.forward(np.asarray(p[:-1]), c)
    batched = tr.forward_batch([(c, np.asarray(p[-1:])) for c, p in zip(caches, prompts, strict=True)])
    for i, p in enumerate(prompts):
        alone = KVCache(model.config, 64)
        ref = tr.forward(np.asarray(p), alone)[-1]
        assert np.array_equal(batched[i], ref), f"sequence {i}: batched logits differ from its own forward"


def test_concurrent_requests_match_sequential_generation(model: Model) -> None:
    prompts = _prompts(model, 6)

    async def run() -> list[tuple[list[int], str, FinalEvent]]:
        sch = Scheduler(model, n_parallel=4)
        sch.start()
        try:
            return await asyncio.gather(*[_collect(sch, Request(p, 24, GREEDY)) for p in prompts])
        finally:
            sch.stop()

    results = asyncio.run(run())
    for p, (tokens, text, final) in zip(prompts, results, strict=True):
        alone = model.complete(p, max_tokens=24, temperature=0)
        assert tokens == alone.tokens
        assert text == alone.text
        assert final.finish_reason == alone.finish_reason
        assert final.prompt_tokens == len(p) and final.completion_tokens == len(tokens)


def test_shared_prefix_is_reused(model: Model) -> None:
    base = model.tokenize("import os\nimport sys\n\n\ndef main(argv):\n    parser = make_parser()\n")

    async def run() -> tuple[FinalEvent, FinalEvent, list[int]]:
        sch = Scheduler(model, n_parallel=1)
        sch.start()
        try:
            _, _, first = await _collect(sch, Request(base, 8, GREEDY))
            tokens, _, second = await _collect(sch, Request(base + model.tokenize("    args"), 8, GREEDY))
            return first, second, tokens
        finally:
            sch.stop()

    first, second, tokens = asyncio.run(run())
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(base)  # the whole shared prefix came from the slot's cache
    alone = model.complete(base + model.tokenize("    args"), max_tokens=8, temperature=0)
    assert tokens == alone.tokens  # and reusing it changed nothing


def test_cancel_frees_the_slot(model: Model) -> None:
    async def run() -> tuple[FinalEvent, int]:
        sch = Scheduler(model, n_parallel=1)
        sch.start()
        try:
            handle = sch.submit(Request(_prompts(model, 1)[0], None, GREEDY))
            final = None
            async for ev in handle.events():
                if isinstance(ev, TokenEvent):
                    handle.cancel()
                else:
                    final = ev
            assert final is not None
            return final, sch.stats().busy_slots
        finally:
            sch.stop()

    final, busy = asyncio.run(run())
    assert final.finish_reason == "cancelled"
    assert busy == 0


def test_queue_full_and_context_errors(model: Model) -> None:
    async def run() -> None:
        sch = Scheduler(model, n_parallel=1, max_queue=1)
        sch.start()
        try:
            long = Request(_prompts(model, 1)[0], None, GREEDY)
            first = sch.submit(long)
            await anext(first.events())  # running in the only slot: it has streamed a token
            sch.submit(long)  # waits in the queue
            with pytest.raises(QueueFullError, match="busy"):
                sch.submit(long)
            first.cancel()
        finally:
            sch.stop(timeout=1)
        with pytest.raises(ContextOverflowError, match="context window"):
            sch.submit(Request(list(range(600)), 1, GREEDY))
        with pytest.raises(ContextOverflowError, match="max_tokens"):
            sch.submit(Request([1, 2, 3], 510, GREEDY))

    asyncio.run(run())


def test_time_limit_and_stop_strings(model: Model) -> None:
    prompt = _prompts(model, 1)[0]
    alone = model.complete(prompt, max_tokens=24, temperature=0)
    stop = alone.text[5:8]
    assert stop, "the greedy continuation is too short for this test"

    async def run() -> tuple[FinalEvent, str, FinalEvent, float]:
        sch = Scheduler(model, n_parallel=2)
        sch.start()
        try:
            _, text, stopped = await _collect(sch, Request(prompt, 24, GREEDY, stop=[stop]))
            start = time.monotonic()
            _, _, limited = await _collect(sch, Request(prompt, None, GREEDY, time_limit=0.2))
            return stopped, text, limited, time.monotonic() - start
        finally:
            sch.stop()

    stopped, text, limited, took = asyncio.run(run())
    assert stopped.finish_reason == "stop" and text == alone.text[: alone.text.index(stop)]
    assert limited.finish_reason == "length" and took < 5


def test_logprobs_are_normalised(model: Model) -> None:
    async def run() -> list[TokenEvent]:
        sch = Scheduler(model, n_parallel=1)
        sch.start()
        try:
            handle = sch.submit(Request(_prompts(model, 1)[0], 4, GREEDY, n_probs=3))
            return [ev async for ev in handle.events() if isinstance(ev, TokenEvent)]
        finally:
            sch.stop()

    events = asyncio.run(run())
    assert len(events) == 4
    for ev in events:
        assert ev.logprob is not None and ev.logprob <= 0 and ev.top_logprobs is not None
        assert len(ev.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert ev.top_logprobs[0] == (ev.token, pytest.approx(ev.logprob))
        assert sum(np.exp(lp) for _, lp in ev.top_logprobs) <= 1.0 + 1e-9


def test_stop_cancels_queued_and_running_requests(model: Model, tmp_path: Path) -> None:
    """One request running (it has streamed a token; unstopped it would fill the context), two
    queued: a stop with no grace period cancels all three. (With a grace period and a sleep instead
    of the first token, an AVX-512 CPU filled the small model's context before the stop.)"""

    async def run() -> list[FinalEvent]:
        sch = Scheduler(model, n_parallel=1, max_queue=4)
        sch.start()
        handles = [sch.submit(Request(_prompts(model, 1)[0], None, GREEDY)) for _ in range(3)]
        running = handles[0].events()
        first = await anext(running)
        assert isinstance(first, TokenEvent), first
        await asyncio.to_thread(sch.stop, 0.0)
        finals = [ev async for ev in running if isinstance(ev, FinalEvent)]
        for h in handles[1:]:
            async for ev in h.events():
                if isinstance(ev, FinalEvent):
                    finals.append(ev)
        return finals

    finals = asyncio.run(run())
    assert [f.finish_reason for f in finals] == ["cancelled"] * 3
    with pytest.raises(QueueFullError, match="shutting down"):
        asyncio.run(_submit_after_stop(model))


async def _submit_after_stop(model: Model) -> None:
    sch = Scheduler(model, n_parallel=1)
    sch.start()
    sch.stop()
    sch.submit(Request([1, 2], 1, GREEDY))


def test_max_tokens_zero_generates_nothing(model: Model) -> None:
    async def run() -> tuple[list[int], FinalEvent]:
        sch = Scheduler(model, n_parallel=1)
        sch.start()
        try:
            tokens, _, final = await _collect(sch, Request(_prompts(model, 1)[0], 0, GREEDY))
            return tokens, final
        finally:
            sch.stop()

    tokens, final = asyncio.run(run())
    assert tokens == [] and final.completion_tokens == 0 and final.finish_reason == "length"


def test_unrelated_request_does_not_evict_a_shared_prefix(model: Model) -> None:
    """With a free empty slot, an unrelated prompt goes there, not over the cached shared prefix."""
    header = model.tokenize("# Copyright the project authors\nimport os\nimport sys\n\n\n")

    async def run() -> FinalEvent:
        sch = Scheduler(model, n_parallel=2)
        sch.start()
        try:
            await _collect(sch, Request(header + model.tokenize("def a():"), 4, GREEDY))
            await _collect(sch, Request(model.tokenize("SELECT * FROM users;"), 4, GREEDY))
            _, _, final = await _collect(sch, Request(header + model.tokenize("def b():"), 4, GREEDY))
            return final
        finally:
            sch.stop()

    assert asyncio.run(run()).cached_tokens >= len(header)


def test_prefix_reuse_can_be_turned_off(model: Model) -> None:
    prompt = _prompts(model, 1)[0]

    async def run() -> FinalEvent:
        sch = Scheduler(model, n_parallel=1)
        sch.start()
        try:
            await _collect(sch, Request(prompt, 2, GREEDY))
            _, _, final = await _collect(sch, Request(prompt, 2, GREEDY, reuse_prefix=False))
            return final
        finally:
            sch.stop()

    assert asyncio.run(run()).cached_tokens == 0


def test_a_cancelled_waiting_request_gives_its_queue_place_back(model: Model) -> None:
    async def run() -> FinalEvent:
        sch = Scheduler(model, n_parallel=1, max_queue=1)
        sch.start()
        try:
            running = sch.submit(Request(_prompts(model, 1)[0], None, GREEDY))
            await anext(running.events())  # running in the only slot: it has streamed a token
            waiting = sch.submit(Request(_prompts(model, 1)[0], 4, GREEDY))
            waiting.cancel()
            assert sch.stats().queue_depth == 0
            sch.submit(Request(_prompts(model, 1)[0], 4, GREEDY))  # the place is free again
            running.cancel()
            return [ev async for ev in waiting.events()][-1]  # type: ignore[return-value]
        finally:
            sch.stop(timeout=1)

    assert asyncio.run(run()).finish_reason == "cancelled"


def test_engine_survives_a_client_whose_event_loop_is_gone(model: Model) -> None:
    sch = Scheduler(model, n_parallel=1)
    sch.start()
    try:
        loop = asyncio.new_event_loop()
        sch.submit(Request(_prompts(model, 1)[0], 8, GREEDY), loop)
        loop.close()  # the engine's events for it now have nowhere to go
        time.sleep(0.5)
        assert sch._thread.is_alive()

        async def again() -> FinalEvent:
            _, _, final = await _collect(sch, Request(_prompts(model, 1)[0], 2, GREEDY))
            return final

        assert asyncio.run(again()).completion_tokens == 2
    finally:
        sch.stop()
