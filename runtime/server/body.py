"""Reading a request body into a validated request type (runtime/server/schemas.py), refusing
anything malformed with a 400 (or 413 when it is too big) before a handler sees it.

Bodies are parsed whatever their Content-Type (`curl -d` sends form encoding; llama.cpp accepts it).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from runtime.server import validation
from runtime.server.errors import APIError, bad_request

MAX_BODY_BYTES = 8 << 20  # 8 MiB: a whole source file and its neighbours fit many times over

M = TypeVar("M")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad_request(f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection while sending the request") from None
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit >> 20} MiB", code="request_too_large")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise bad_request("the request body is empty: send a JSON object", code="invalid_json")
    try:
        obj = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise bad_request(
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", code="invalid_json"
        ) from None
    except ValueError as e:  # NaN / Infinity
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, not {_json_type(obj)}", code="invalid_json")
    _check_strings(obj)
    return obj


def _json_type(v: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(v), "null"
    )


def _check_strings(obj: object) -> None:
    """JSON escapes can spell lone surrogates (\\ud800) that are not text: refuse them here rather
    than fail deep inside the tokenizer."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad_request("a string in the request contains an unpaired UTF-16 surrogate") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def validate(model: type[M], obj: dict[str, Any]) -> M:
    try:
        return validation.validate(model, obj)
    except validation.Invalid as e:
        raise bad_request(e.message, param=e.param) from None


async def parse(request: Request, model: type[M], limit: int = MAX_BODY_BYTES) -> M:
    """The body of `request` as `model`; APIError (400/413) when it is not one."""
    return validate(model, parse_json_object(await read_body(request, limit)))
