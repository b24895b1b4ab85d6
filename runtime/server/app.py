"""The FastAPI application: `create_app(model_path or Model, ...)`.

The model loads in the background when the app starts (GET /health answers 503 `{"status":
"loading"}` until it is ready, then 200 `{"status": "ok"}`); the app's shutdown stops the scheduler
within `shutdown_timeout`. Run it with `python -m runtime serve` (runtime/server/serve.py) or any
ASGI server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime.engine import Model
from runtime.server import llama_api, openai_api
from runtime.server.auth import require_api_key
from runtime.server.errors import install_error_handlers
from runtime.server.loading import ModelLoad
from runtime.server.metrics import RequestCounter
from runtime.server.state import ServerConfig, ServerState

public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)])


@public.get("/health")
async def health(request: Request) -> Response:
    state: ServerState = request.app.state.llm
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=500)
    if state.shutting_down:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    if state.scheduler is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok"})


@protected.get("/metrics")
async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.llm
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    model: str | os.PathLike[str] | Model | ModelLoad,
    *,
    config: ServerConfig | None = None,
    on_fatal: Callable[[], None] | None = None,
    **options: Any,
) -> FastAPI:
    """The server for one model. `options` are ServerConfig fields (n_parallel, max_queue, n_ctx,
    n_threads, api_key, alias, request_timeout, shutdown_timeout, max_body_bytes) when no `config`
    is given. `on_fatal` is called if the model fails to load (the CLI stops the server then)."""
    cfg = config if config is not None else ServerConfig(**options)
    state = ServerState(model, cfg, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(
        title="llmctl runtime",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.llm = state
    install_error_handlers(app)
    routers = (public, protected, openai_api.router, llama_api.router)
    app.include_router(public)
    app.include_router(protected)
    for router in (openai_api.router, llama_api.router):
        app.include_router(router, dependencies=[Depends(require_api_key)])
    paths = [path for router in routers for r in router.routes if isinstance(path := getattr(r, "path", None), str)]
    app.add_middleware(RequestCounter, metrics=state.metrics, known_paths=lambda: paths)
    return app
