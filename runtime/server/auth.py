"""The optional API key: `Authorization: Bearer KEY` on every endpoint but /health."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from runtime.server.errors import APIError


def require_api_key(request: Request) -> None:
    """The guard of every endpoint but /health: 401 unless the request carries the server's key
    (compared in constant time)."""
    key: str | None = request.app.state.llm.config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # header values arrive latin-1 decoded: back to their bytes, whatever the client sent
    given = token.strip().encode("latin-1", errors="replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, key.encode("utf-8")):
        raise APIError(
            401,
            "a valid API key is required: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
