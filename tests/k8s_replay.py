"""A Kubernetes API server on loopback that replays a recorded exchange, for the kubernetes driver's tests.

No cluster runs where llmctl is developed, so the driver's calls are checked against an exchange kept
in a YAML file (tests/fixtures/k8s/*.yaml): an ordered list of requests and the answers the API server
gives them. `ReplayServer` serves it over HTTPS (a test CA) and demands the kubeconfig's bearer token,
as a cluster does; the real `kubernetes` client talks to it through a kubeconfig the server writes.

Each request must be the next one in the file:

    - request: {method: PATCH, path: /apis/apps/v1/namespaces/models/deployments/sc2,
                query: {labelSelector: ...}, content_type: application/merge-patch+json,
                body: {...}}          # query and body: what the request must contain (a subset)
      response: {status: 200, body: {...}}   # a JSON object, or a string (sent as text/plain)

A body pattern matches when every key it names matches (lists element by element, same length), and
the string "<any>" matches any value. A request that is not the next one, or that does not match, is
answered 500 with a Status naming the difference, and recorded in `errors`; `check()` fails a test
that left errors or unanswered exchanges. `requests` keeps every request received (with its body).
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.registry_server import TestCA

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "k8s"
TOKEN = "llmctl-replay-token"
ANY = "<any>"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any


def load_exchange(name: str, **values: str) -> list[dict[str, Any]]:
    """The exchange in tests/fixtures/k8s/NAME.yaml; `{key}` placeholders in it are replaced first."""
    text = (FIXTURES / f"{name}.yaml").read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    exchange = yaml.safe_load(text)
    return list(exchange["exchange"])


def mismatch(pattern: Any, value: Any, where: str = "body") -> str | None:
    """Where `value` does not match `pattern` (None when it does)."""
    if pattern == ANY:
        return None
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return f"{where}: expected an object, got {value!r:.80}"
        for key, sub in pattern.items():
            if key not in value:
                return f"{where}.{key}: missing"
            problem = mismatch(sub, value[key], f"{where}.{key}")
            if problem:
                return problem
        return None
    if isinstance(pattern, list):
        if not isinstance(value, list) or len(value) != len(pattern):
            return f"{where}: expected a list of {len(pattern)}, got {value!r:.120}"
        for i, (sub, item) in enumerate(zip(pattern, value, strict=True)):
            problem = mismatch(sub, item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    return None if pattern == value else f"{where}: expected {pattern!r}, got {value!r:.120}"


class ReplayServer:
    """`with ReplayServer(tmp_path, exchange) as api:` ... `api.kubeconfig` ... `api.check()`."""

    def __init__(self, directory: Path, exchange: list[dict[str, Any]], namespace: str = "models") -> None:
        self.directory = directory
        self.exchange = exchange
        self.namespace = namespace
        self.position = 0
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._ca = TestCA(directory / "tls")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._ca.cert_file, self._ca.key_file)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_port}"

    def write_kubeconfig(self, token: str = TOKEN) -> Path:
        """A kubeconfig with one context: this server, the test CA, a bearer token, the namespace."""
        path = self.directory / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "replay", "cluster": {"server": self.url, "certificate-authority": str(self._ca.ca_file)}}
            ],
            "users": [{"name": "llmctl", "user": {"token": token}}],
            "contexts": [
                {"name": "replay", "context": {"cluster": "replay", "user": "llmctl", "namespace": self.namespace}}
            ],
            "current-context": "replay",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def answer(self, request: Request, authorization: str | None) -> tuple[int, Any]:
        if authorization != f"Bearer {TOKEN}":
            return 401, {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": "Unauthorized",
                "code": 401,
            }
        with self._lock:
            self.requests.append(request)
            if self.position >= len(self.exchange):
                problem = "an unexpected request after the end of the exchange"
            else:
                expected = self.exchange[self.position]["request"]
                problem = None
                if (request.method, request.path) != (expected["method"], expected["path"]):
                    problem = f"expected {expected['method']} {expected['path']}"
                for check, pattern, value in (
                    ("query", expected.get("query"), request.query),
                    ("body", expected.get("body"), request.body),
                ):
                    if problem is None and pattern is not None:
                        problem = mismatch(pattern, value, check)
                wanted_type = expected.get("content_type")
                if problem is None and wanted_type and request.content_type != wanted_type:
                    problem = f"content type {request.content_type!r}, expected {wanted_type!r}"
            if problem is not None:
                error = f"request {len(self.requests)} ({request.method} {request.path}): {problem}"
                self.errors.append(error)
                return 500, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": f"replay: {error}"}
            response = self.exchange[self.position]["response"]
            self.position += 1
            return int(response["status"]), response.get("body", {})

    def check(self) -> None:
        """Fail unless every request matched and every exchange was used."""
        assert not self.errors, "\n".join(self.errors)
        left = [f"{e['request']['method']} {e['request']['path']}" for e in self.exchange[self.position :]]
        assert not left, f"requests the driver did not make: {left}"

    def __enter__(self) -> ReplayServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(server: ReplayServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            content_type = (self.headers.get("Content-Type") or "").split(";")[0]
            request = Request(self.command, url.path, query, content_type, body)
            status, answer = server.answer(request, self.headers.get("Authorization"))
            data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve  # noqa: N815 (http.server's naming)

    return Handler
