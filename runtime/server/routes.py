"""A module's endpoints, declared next to their handlers: `api = Endpoints()`, then
`@api.post("/v1/completions")` on each handler; the app takes `api.routes(guard)`.

Plain Starlette routes: the server needs routing, not FastAPI's dependency injection and OpenAPI
models, whose import was a third of the interpreter's work before the port opened (docs/server.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[[Request], None]


class Endpoints:
    def __init__(self) -> None:
        self._handlers: list[tuple[str, str, Handler]] = []

    def get(self, *paths: str) -> Callable[[Handler], Handler]:
        return self._add("GET", paths)

    def post(self, *paths: str) -> Callable[[Handler], Handler]:
        return self._add("POST", paths)

    def _add(self, method: str, paths: tuple[str, ...]) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self._handlers.extend((path, method, handler) for path in paths)
            return handler

        return register

    def routes(self, guard: Guard | None = None) -> list[Route]:
        """One route per path and method; `guard` (the API key check) runs before each handler
        and refuses a request by raising."""
        return [Route(path, _guarded(handler, guard), methods=[method]) for path, method, handler in self._handlers]


def _guarded(handler: Handler, guard: Guard | None) -> Handler:
    if guard is None:
        return handler

    async def checked(request: Request) -> Response:
        guard(request)
        return await handler(request)

    return checked
