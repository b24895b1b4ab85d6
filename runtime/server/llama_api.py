"""llama.cpp-server-compatible endpoints: /completion, /infill, /tokenize, /detokenize, /props, /slots.

What Continue's, Tabby's and llama.vscode's llama.cpp providers send and read: `content` pieces
as server-sent events, a final object with `stop: true`, `stop_type`, token counts and timings.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runtime.engine import Model
from runtime.server import body
from runtime.server.generation import EventStream, Job, Run, collect, finite, sse
from runtime.server.prompts import (
    CHAT_TEMPLATE_DOC,
    check_ids,
    infill_prompt,
    llama_prompt,
    sampling,
    stop_list,
    tokenize,
)
from runtime.server.routes import Endpoints
from runtime.server.scheduler import FinalEvent, TokenEvent
from runtime.server.schemas import (
    DetokenizeRequest,
    InfillRequest,
    LlamaCompletionRequest,
    LlamaOptions,
    TokenizeRequest,
)
from runtime.server.state import ServerState
from runtime.tokenizer import CodeTokenizer

api = Endpoints()

DEFAULTS = LlamaOptions()


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.llm
    return state


def _n_predict(req: LlamaOptions) -> int:
    if req.n_predict is not None:
        return req.n_predict
    return req.max_tokens if req.max_tokens is not None else -1


def _settings(state: ServerState, model: Model, req: LlamaOptions, seed: int | None) -> dict[str, Any]:
    """llama.cpp's `generation_settings`: the options a request ran with."""
    return {
        "n_ctx": model.n_ctx,
        "n_predict": _n_predict(req),
        "model": state.alias,
        "temperature": req.temperature,
        "top_k": req.top_k,
        "top_p": req.top_p,
        "min_p": req.min_p,
        "repeat_penalty": req.repeat_penalty,
        "repeat_last_n": req.repeat_last_n,
        "seed": seed,
        "stop": stop_list(req.stop),
        "stream": req.stream,
        "n_probs": req.n_probs,
        "cache_prompt": req.cache_prompt,
    }


def _probs(tok: CodeTokenizer, events: Sequence[TokenEvent]) -> list[dict[str, Any]]:
    """`completion_probabilities` in llama.cpp's current format."""

    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        raw = tok.token_bytes(token)
        return {"id": token, "token": tok.decode([token]), "bytes": list(raw), "logprob": finite(logprob)}

    return [
        {**entry(e.token, e.logprob), "top_logprobs": [entry(t, p) for t, p in e.top_logprobs or []]} for e in events
    ]


def _stop_type(tok: CodeTokenizer, final: FinalEvent, generated: list[int], stops: list[str]) -> tuple[str, str]:
    """(stop_type, stopping_word): "limit" (n_predict, context or time limit), "word" (a stop
    string: it is in the text of the generated tokens, which the returned text cuts before it) or "eos"."""
    if final.finish_reason == "length":
        return "limit", ""
    if stops:
        text = tok.decode(generated)
        hits = [(text.find(s), s) for s in stops if s and s in text]
        if hits:
            return "word", min(hits)[1]
    return "eos", ""


def _timings(run: Run, final: FinalEvent, ended: float) -> dict[str, float]:
    first = run.first_token_at if run.first_token_at is not None else ended
    prompt_ms = (first - run.submitted) * 1000
    predicted_ms = (ended - first) * 1000
    prompt_n = final.prompt_tokens - final.cached_tokens
    predicted_n = final.completion_tokens
    return {
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / predicted_ms * 1000 if predicted_ms > 0 else 0.0,
    }


async def _generate(request: Request, state: ServerState, model: Model, req: LlamaOptions, ids: list[int]) -> Response:
    n_predict = _n_predict(req)
    params = sampling(
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        min_p=req.min_p,
        repeat_penalty=req.repeat_penalty,
        repeat_last_n=req.repeat_last_n,
        seed=req.seed,
        n_ctx=model.n_ctx,
    )
    stops = stop_list(req.stop)
    time_limit = req.t_max_predict_ms / 1000 if req.t_max_predict_ms else None
    job = Job(
        ids,
        None if n_predict < 0 else n_predict,
        params,
        stops,
        req.n_probs,
        time_limit,
        clamp_to_context=True,
        reuse_prefix=req.cache_prompt,
    )
    run = Run.start(state, job)
    tok = model.tokenizer
    n_prompt = len(ids)
    settings = _settings(state, model, req, params.seed)

    def final_object(final: FinalEvent, content: str, generated: list[int], ended: float) -> dict[str, Any]:
        stop_type, word = _stop_type(tok, final, generated, stops)
        return {
            "index": 0,
            "content": content,
            "tokens": generated if req.return_tokens else [],
            "id_slot": -1,
            "stop": True,
            "model": state.alias,
            "tokens_predicted": final.completion_tokens,
            "tokens_evaluated": final.prompt_tokens,
            "tokens_cached": final.cached_tokens,
            "generation_settings": settings,
            "has_new_line": "\n" in content,
            "truncated": False,
            "stop_type": stop_type,
            "stopping_word": word,
            "timings": _timings(run, final, ended),
        }

    if req.stream:

        async def stream() -> AsyncIterator[str]:
            generated: list[int] = []
            async for event in run.events():
                if isinstance(event, TokenEvent):
                    generated.append(event.token)
                    if not event.text and not req.n_probs:
                        continue
                    piece: dict[str, Any] = {
                        "index": 0,
                        "content": event.text,
                        "tokens": [event.token] if req.return_tokens else [],
                        "stop": False,
                        "id_slot": -1,
                        "tokens_predicted": len(generated),
                        "tokens_evaluated": n_prompt,
                    }
                    if req.n_probs:
                        piece["completion_probabilities"] = _probs(tok, [event])
                    yield sse(piece)
                    continue
                error = run.failure(event)
                if error is not None:
                    yield sse(error.body())
                else:
                    yield sse(final_object(event, event.text, generated, time.monotonic()))

        return EventStream(stream(), run)

    out = await collect(run, request)
    result = final_object(out.final, out.text, [e.token for e in out.tokens], out.ended)
    result["prompt"] = tok.decode(ids)
    if req.n_probs:
        result["completion_probabilities"] = _probs(tok, out.tokens)
    return JSONResponse(result)


@api.post("/completion", "/completions")
async def completion(request: Request) -> Response:
    state = _state(request)
    req = await body.parse(request, LlamaCompletionRequest, state.config.max_body_bytes)
    model, _ = state.require_model()
    ids = await llama_prompt(model, req.prompt)
    return await _generate(request, state, model, req, ids)


@api.post("/infill")
async def infill(request: Request) -> Response:
    """Fill in the middle: <fim_prefix>{input_prefix}<fim_suffix>{input_suffix}<fim_middle>{prompt};
    with input_extra, the repository-level form with a <file_sep> section per extra file."""
    state = _state(request)
    req = await body.parse(request, InfillRequest, state.config.max_body_bytes)
    model, _ = state.require_model()
    extra = [(f.filename, f.text) for f in req.input_extra]
    ids = await infill_prompt(model, req.input_prefix, req.input_suffix, extra_files=extra, middle=req.prompt)
    return await _generate(request, state, model, req, ids)


@api.post("/tokenize")
async def tokenize_(request: Request) -> Response:
    state = _state(request)
    req = await body.parse(request, TokenizeRequest, state.config.max_body_bytes)
    model, _ = state.require_model()
    tok = model.tokenizer
    ids = await tokenize(model, req.content, special=req.parse_special, add_bos=None if req.add_special else False)
    if not req.with_pieces:
        return JSONResponse({"tokens": ids})
    pieces: list[dict[str, Any]] = []
    for i in ids:
        raw = tok.token_bytes(i)
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)  # part of a character: its bytes, as llama.cpp
        pieces.append({"id": i, "piece": piece})
    return JSONResponse({"tokens": pieces})


@api.post("/detokenize")
async def detokenize(request: Request) -> Response:
    state = _state(request)
    req = await body.parse(request, DetokenizeRequest, state.config.max_body_bytes)
    model, _ = state.require_model()
    ids = check_ids(model, req.tokens, "tokens")
    return JSONResponse({"content": model.tokenizer.decode(ids)})


@api.get("/props")
async def props(request: Request) -> Response:
    state = _state(request)
    model, _ = state.require_model()
    defaults = _settings(state, model, DEFAULTS, -1)
    return JSONResponse(
        {
            "n_ctx": model.n_ctx,
            "total_slots": state.config.n_parallel,
            "model_path": str(model.path),
            "model_alias": state.alias,
            "default_generation_settings": {"n_ctx": model.n_ctx, "params": defaults, **defaults},
            "chat_template": CHAT_TEMPLATE_DOC,
            "modalities": {"vision": False, "audio": False},
            "fim": sorted(model.tokenizer.fim_ids),
            "build_info": "llmctl runtime",
        }
    )


@api.get("/slots")
async def slots(request: Request) -> Response:
    state = _state(request)
    model, scheduler = state.require_model()
    out = []
    for i, slot in enumerate(scheduler.slots):
        out.append(
            {
                "id": i,
                "n_ctx": model.n_ctx,
                "is_processing": slot.handle is not None,
                "n_cached_tokens": len(slot.cached),
            }
        )
    return JSONResponse(out)
