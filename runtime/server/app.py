"""The ASGI application (Starlette): `create_app(model_path or Model, ...)`.

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

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from runtime.engine import Model
from runtime.server import llama_api, openai_api
from runtime.server.auth import require_api_key
from runtime.server.errors import EXCEPTION_HANDLERS
from runtime.server.loading import ModelLoad
from runtime.server.metrics import RequestCounter
from runtime.server.routes import Endpoints
from runtime.server.state import ServerConfig, ServerState

public = Endpoints()
protected = Endpoints()  # with the API key, as every endpoint of the two APIs


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
) -> Starlette:
    """The server for one model. `options` are ServerConfig fields (n_parallel, max_queue, n_ctx,
    n_threads, api_key, alias, request_timeout, shutdown_timeout, max_body_bytes) when no `config`
    is given. `on_fatal` is called if the model fails to load (the CLI stops the server then)."""
    cfg = config if config is not None else ServerConfig(**options)
    state = ServerState(model, cfg, on_fatal)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await state.shutdown()

    routes = public.routes()
    for endpoints in (protected, openai_api.api, llama_api.api):
        routes += endpoints.routes(guard=require_api_key)
    counter = Middleware(RequestCounter, metrics=state.metrics, known_paths=[route.path for route in routes])
    app = Starlette(routes=routes, middleware=[counter], exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.llm = state
    return app
