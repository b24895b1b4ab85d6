"""A small HTTP file server on loopback for download tests: Range support and per-path faults.

``server.add(path, data, faults=[...], ignore_range=False)`` serves ``data`` at ``path``. Each
request to the path consumes the next fault in the list; when the list is empty, it is served
correctly. Faults:

- ``"truncate"``: promise the full Content-Length, send half of it, close the connection.
- ``"500"`` (any 3-digit status): answer with that status and no body.
- ``"stall"``: send half the body, then go silent for ``stall_seconds`` and close.

Unknown paths answer 404. ``server.requests`` records ``(path, Range header or None)`` per request
and ``server.bytes_sent`` the body bytes written.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Entry:
    data: bytes
    faults: list[str] = field(default_factory=list)
    ignore_range: bool = False


class FileServer:
    def __init__(self, stall_seconds: float = 2.0) -> None:
        self.entries: dict[str, Entry] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        self.stall_seconds = stall_seconds
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, data: bytes, faults: list[str] | None = None, ignore_range: bool = False) -> str:
        self.entries[path] = Entry(data, list(faults or []), ignore_range)
        return self.url(path)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def serving(stall_seconds: float = 2.0) -> Iterator[FileServer]:
    server = FileServer(stall_seconds)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a cut body is visible to the client

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def _send_body(self, data: bytes) -> None:
            self.wfile.write(data)
            self.wfile.flush()
            with server.lock:
                server.bytes_sent += len(data)

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            range_header = self.headers.get("Range")
            with server.lock:
                server.requests.append((path, range_header))
                entry = server.entries.get(path)
                fault = entry.faults.pop(0) if entry and entry.faults else None
            if entry is None:
                self.send_error(404, "Not Found")
                return
            if fault and fault.isdigit():
                self.send_response(int(fault))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, start, status = entry.data, 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if match and not entry.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            try:
                if fault == "truncate":
                    self._send_body(body[: len(body) // 2])
                elif fault == "stall":
                    self._send_body(body[: len(body) // 2])
                    time.sleep(server.stall_seconds)
                else:
                    self._send_body(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler
