"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runtime.engine import Model
from runtime.sampling import SamplingParams
from runtime.server import body
from runtime.server.errors import bad_request
from runtime.server.generation import EventStream, Job, Run, collect, finite, sse
from runtime.server.prompts import (
    CHAT_STOP,
    chat_prompt,
    infill_prompt,
    openai_prompt,
    sampling,
    stop_list,
    tokenize,
)
from runtime.server.routes import Endpoints
from runtime.server.scheduler import FinalEvent, TokenEvent
from runtime.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAIOptions
from runtime.server.state import ServerState
from runtime.tokenizer import CodeTokenizer

api = Endpoints()

DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI's


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.llm
    return state


def _check_single_choice(req: OpenAIOptions, best_of: int | None = None) -> None:
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n} is not supported: this server returns one choice (n=1)", param="n")
    if best_of not in (None, 1):
        raise bad_request(f"best_of={best_of} is not supported (only 1)", param="best_of")


def _sampling(req: OpenAIOptions, model: Model) -> SamplingParams:
    return sampling(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=0 if req.top_k is None else req.top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=0.0 if req.min_p is None else req.min_p,
        repeat_penalty=1.0 if req.repeat_penalty is None else req.repeat_penalty,
        seed=req.seed,
        n_ctx=model.n_ctx,
    )


def _usage(final: FinalEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": final.cached_tokens},
    }


def _token_text(tok: CodeTokenizer, token: int) -> str:
    return tok.decode([token])


class _LegacyLogprobs:
    """The `logprobs` object of /v1/completions, for a run of tokens: tokens, token_logprobs,
    top_logprobs (the `top_n` most likely alternatives per token) and text_offset (where each
    token starts in the returned text, echoed prompt included)."""

    def __init__(self, tok: CodeTokenizer, top_n: int) -> None:
        self.tok = tok
        self.top_n = top_n
        self.offset = 0

    def _new(self) -> dict[str, list[Any]]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def prompt(self, ids: Sequence[int]) -> dict[str, list[Any]]:
        """The echoed prompt's tokens; their log-probabilities are not computed (null)."""
        out = self._new()
        for i in ids:
            text = _token_text(self.tok, i)
            out["tokens"].append(text)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def tokens(self, events: Sequence[TokenEvent]) -> dict[str, list[Any]]:
        out = self._new()
        for e in events:
            text = _token_text(self.tok, e.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(finite(e.logprob))
            top: dict[str, float | None] = {}
            for tid, lp in (e.top_logprobs or [])[: self.top_n]:
                top.setdefault(_token_text(self.tok, tid), finite(lp))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    @staticmethod
    def merge(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {k: a[k] + b[k] for k in a}


# --- /v1/completions ---------------------------------------------------------------------------


@api.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = _state(request)
    req = await body.parse(request, CompletionRequest, state.config.max_body_bytes)
    model, _ = state.require_model()
    _check_single_choice(req, req.best_of)
    if req.suffix is not None:
        prefix = req.prompt
        if isinstance(prefix, list) and len(prefix) == 1 and isinstance(prefix[0], str):
            prefix = prefix[0]
        if not isinstance(prefix, str):
            raise bad_request("with 'suffix' (fill in the middle) the prompt must be text", param="prompt")
        ids = await infill_prompt(model, prefix, req.suffix, param="suffix")
        prompt_text = prefix
    else:
        ids, prompt_text = await openai_prompt(model, req.prompt)
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    n_probs = 0 if req.logprobs is None else max(1, req.logprobs)
    job = Job(ids, max_tokens, _sampling(req, model), stop_list(req.stop), n_probs)
    run = Run.start(state, job)

    cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    lp = _LegacyLogprobs(model.tokenizer, req.logprobs or 0) if req.logprobs is not None else None
    echo_text = prompt_text if req.echo else ""
    echo_lp = lp.prompt(ids) if lp is not None and req.echo else None

    def chunk(text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": state.alias,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}],
        }

    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def stream() -> AsyncIterator[str]:
            if req.echo:
                yield sse(chunk(echo_text, echo_lp, None))
            async for event in run.events():
                if isinstance(event, TokenEvent):
                    if event.text or lp is not None:
                        yield sse(chunk(event.text, lp.tokens([event]) if lp else None, None))
                    continue
                error = run.failure(event)
                if error is not None:
                    yield sse(error.body())
                else:
                    yield sse(chunk(event.text, None, event.finish_reason))
                    if include_usage:
                        yield sse({**chunk("", None, None), "choices": [], "usage": _usage(event)})
            yield "data: [DONE]\n\n"

        return EventStream(stream(), run)

    out = await collect(run, request)
    logprobs = None
    if lp is not None:
        gen = lp.tokens(out.tokens)
        logprobs = lp.merge(echo_lp, gen) if echo_lp is not None else gen
    body_ = chunk(echo_text + out.text, logprobs, out.final.finish_reason)
    body_["usage"] = _usage(out.final)
    return JSONResponse(body_)


# --- /v1/chat/completions ----------------------------------------------------------------------


class _StripLeadingSpace:
    """The template ends with "assistant:", so a reply usually starts with a space: drop that one."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, text: str) -> str:
        if self.started or not text:
            return text
        self.started = True
        return text[1:] if text.startswith(" ") else text


def _chat_logprobs(tok: CodeTokenizer, events: Sequence[TokenEvent], top_n: int) -> list[dict[str, Any]]:
    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        return {"token": _token_text(tok, token), "logprob": finite(logprob), "bytes": list(tok.token_bytes(token))}

    return [
        {**entry(e.token, e.logprob), "top_logprobs": [entry(t, p) for t, p in (e.top_logprobs or [])[:top_n]]}
        for e in events
    ]


@api.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    req = await body.parse(request, ChatCompletionRequest, state.config.max_body_bytes)
    model, _ = state.require_model()
    _check_single_choice(req)
    ids = await tokenize(model, chat_prompt(req.messages), special=False)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top_n = (req.top_logprobs or 0) if req.logprobs else 0
    n_probs = max(1, top_n) if req.logprobs else 0
    job = Job(ids, max_tokens, _sampling(req, model), [CHAT_STOP, *stop_list(req.stop)], n_probs)
    run = Run.start(state, job)

    cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    strip = _StripLeadingSpace()

    def logprobs_of(events: Sequence[TokenEvent]) -> dict[str, Any] | None:
        if not req.logprobs:
            return None
        return {"content": _chat_logprobs(model.tokenizer, events, top_n), "refusal": None}

    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def chunk(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.alias,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }

        async def stream() -> AsyncIterator[str]:
            yield sse(chunk({"role": "assistant", "content": ""}, None))
            async for event in run.events():
                if isinstance(event, TokenEvent):
                    text = strip(event.text)
                    if text or req.logprobs:
                        yield sse(chunk({"content": text}, None, logprobs_of([event])))
                    continue
                error = run.failure(event)
                if error is not None:
                    yield sse(error.body())
                else:
                    tail = strip(event.text)
                    yield sse(chunk({"content": tail} if tail else {}, event.finish_reason))
                    if include_usage:
                        yield sse({**chunk({}, None), "choices": [], "usage": _usage(event)})
            yield "data: [DONE]\n\n"

        return EventStream(stream(), run)

    out = await collect(run, request)
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": state.alias,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": strip(out.text)},
                    "logprobs": logprobs_of(out.tokens),
                    "finish_reason": out.final.finish_reason,
                }
            ],
            "usage": _usage(out.final),
        }
    )


# --- /v1/models --------------------------------------------------------------------------------


@api.get("/v1/models")
async def models(request: Request) -> Response:
    state = _state(request)
    entry: dict[str, Any] = {"id": state.alias, "object": "model", "created": state.created, "owned_by": "llmctl"}
    model = state.model
    if model is not None:
        entry["meta"] = {
            "n_ctx": model.n_ctx,
            "n_ctx_train": model.config.n_ctx_train,
            "n_vocab": model.tokenizer.n_vocab,
            "n_embd": model.config.n_embd,
            "architecture": model.config.arch,
            "size": model.path.stat().st_size,
        }
    return JSONResponse({"object": "list", "data": [entry]})
