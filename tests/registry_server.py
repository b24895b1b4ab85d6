"""A real OCI registry on loopback for tests: Debian's ``docker-registry`` (distribution 2.8.2).

``RegistryServer(workdir, tls=..., users=..., token=...)`` writes a config, starts
``/usr/bin/docker-registry serve`` on a free 127.0.0.1 port with its storage under `workdir`, waits
until ``/v2/`` answers, and stops it (terminate, wait) on ``stop()`` / leaving the ``with`` block.

- ``tls=True``: a test CA and a server certificate for 127.0.0.1 and localhost (``server.ca_file``).
- ``users={"alice": "pw"}``: htpasswd (bcrypt, ``htpasswd -Bbn``) Basic auth.
- ``token=TokenServer(users)``: token auth. The token server runs on loopback and issues ES256 JWTs
  signed by a key whose self-signed certificate is the registry's ``rootcertbundle``; its lifetime,
  the ``expires_in`` it advertises and a "wrong key" switch (tokens the registry refuses) are settable.

``TamperProxy(upstream_port)`` forwards HTTP to the registry and, when asked, flips one byte of blob or
manifest responses, or drops the connection in the middle of a PATCH after forwarding half its body.

The tests need ``/usr/bin/docker-registry`` (``apt-get install docker-registry``; ``htpasswd`` comes
from apache2-utils); `skip_reason()` says why they cannot run where it is absent.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import ipaddress
import json
import secrets
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.netutil import free_port

REGISTRY_BIN = Path("/usr/bin/docker-registry")
HTPASSWD_BIN = Path("/usr/bin/htpasswd")
SERVICE = "llmctl-test-registry"
ISSUER = "llmctl-test-token-issuer"
# distribution accepts a token up to 60 s after its `exp` (token.Leeway): a token meant to live
# `ttl` seconds gets exp = now + ttl - LEEWAY so that it really stops working after `ttl` seconds.
LEEWAY = 60


def skip_reason() -> str | None:
    """Why the registry tests cannot run here (None when they can)."""
    if not REGISTRY_BIN.is_file():
        return f"{REGISTRY_BIN} is not installed (apt-get install docker-registry)"
    return None


# -- certificates ---------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def self_signed(cn: str, key: ec.EllipticCurvePrivateKey, *, ca: bool = True) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


@dataclass
class TestCA:
    """A CA and one server certificate (SAN 127.0.0.1, ::1, localhost), written as PEM files in `directory`."""

    directory: Path
    ca_file: Path = field(init=False)
    cert_file: Path = field(init=False)
    key_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = self_signed("llmctl test CA", ca_key)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("127.0.0.1"))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file = self.directory / "ca.pem"
        self.cert_file = self.directory / "tls.crt"
        self.key_file = self.directory / "tls.key"
        self.ca_file.write_bytes(_pem_cert(ca_cert))
        self.cert_file.write_bytes(_pem_cert(cert))
        self.key_file.write_bytes(_pem_key(key))


# -- token server ---------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(key: ec.EllipticCurvePublicKey) -> str:
    """docker/libtrust's key ID: base32 of the first 240 bits of sha256(PKIX DER), in 4-char groups."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


class TokenServer:
    """A Docker token-auth server (distribution ``docs/spec/auth/token.md``) on loopback.

    `users` maps user names to passwords (checked with Basic auth); anonymous callers get no access.
    Every request is recorded in `requests` as (user or None, [scopes]).
    """

    def __init__(self, users: dict[str, str], *, ttl: float = 300, advertised_ttl: float | None = None) -> None:
        self.users = dict(users)
        self.ttl = ttl
        self.advertised_ttl = advertised_ttl
        self.wrong_key = False  # sign with a key the registry does not trust (a revoked signer)
        self.denied: set[str] = set()  # repositories nobody gets any access to
        self.requests: list[tuple[str | None, list[str]]] = []
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self_signed("llmctl test token signer", self.key)
        self.other_key = ec.generate_private_key(ec.SECP256R1())
        self.other_cert = self_signed("llmctl test token signer", self.other_key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def realm(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/token"

    def write_bundle(self, path: Path) -> Path:
        path.write_bytes(_pem_cert(self.cert))
        return path

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def issue(self, user: str | None, scopes: list[str]) -> dict[str, Any]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and user is not None and name not in self.denied:
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        key, cert = (self.other_key, self.other_cert) if self.wrong_key else (self.key, self.cert)
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "kid": libtrust_key_id(key.public_key()),
            "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "exp": now + int(self.ttl) - LEEWAY,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        token = f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
        advertised = self.ttl if self.advertised_ttl is None else self.advertised_ttl
        return {
            "token": token,
            "access_token": token,
            "expires_in": int(advertised),
            "issued_at": dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def _token_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
            user = None
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                if server.users.get(name) != password:
                    server.requests.append((name, scopes))
                    self._reply(401, {"details": "incorrect username or password"})
                    return
                user = name
            server.requests.append((user, scopes))
            if query.get("service") != [SERVICE]:
                self._reply(400, {"details": f"unknown service {query.get('service')}"})
                return
            self._reply(200, server.issue(user, scopes))

    return Handler


# -- the registry ---------------------------------------------------------------------------------


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1 with filesystem storage under `workdir`."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = False,
        users: dict[str, str] | None = None,
        token: TokenServer | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA(workdir / "tls") if tls else None
        self.users = users
        self.token = token
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file = workdir / "registry.log"

    @property
    def host(self) -> str:
        """`127.0.0.1:<port>`: the registry part of a reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.host}"

    @property
    def ca_file(self) -> Path | None:
        return self.ca.ca_file if self.ca else None

    def _config(self) -> str:
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        lines = [
            "version: 0.1",
            "log: {level: warn, accesslog: {disabled: true}}",
            "storage:",
            f"  filesystem: {{rootdirectory: {storage}}}",
            "  delete: {enabled: true}",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: llmctl-test-secret",
        ]
        if self.ca:
            lines.append(f"  tls: {{certificate: {self.ca.cert_file}, key: {self.ca.key_file}}}")
        if self.users is not None:
            htpasswd = self.workdir / "htpasswd"
            entries = [
                subprocess.run(
                    [str(HTPASSWD_BIN), "-Bbn", user, password], check=True, capture_output=True, text=True
                ).stdout.strip()
                for user, password in self.users.items()
            ]
            htpasswd.write_text("\n".join(entries) + "\n")
            lines += ["auth:", f"  htpasswd: {{realm: llmctl-test, path: {htpasswd}}}"]
        elif self.token is not None:
            bundle = self.token.write_bundle(self.workdir / "token-signer.pem")
            lines += [
                "auth:",
                "  token:",
                f"    realm: {self.token.realm}",
                f"    service: {SERVICE}",
                f"    issuer: {ISSUER}",
                f"    rootcertbundle: {bundle}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> None:
        if reason := skip_reason():
            raise RuntimeError(reason)
        if self.token is not None and not self.token.thread.is_alive():
            self.token.start()
        for _attempt in range(3):  # a free port can be taken between picking it and binding it
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(self._config())
            with open(self.log_file, "ab") as log:
                self.process = subprocess.Popen(
                    [str(REGISTRY_BIN), "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
                )
            if self._wait_ready(timeout):
                return
            self.stop()
        raise RuntimeError(f"docker-registry did not start; log:\n{self.log_file.read_text()[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        verify: str | bool = str(self.ca_file) if self.ca_file else True
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                status = requests.get(f"{self.url}/v2/", timeout=2, verify=verify).status_code
            except requests.RequestException:
                status = None
            if status in (200, 401):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.token is not None and self.token.thread.is_alive():
            self.token.stop()

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- a tampering proxy ----------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class TamperProxy:
    """Plain-HTTP forwarding proxy to a loopback registry, with faults for tests.

    - ``tamper_blobs`` / ``tamper_manifests``: flip one byte in the body of every GET response for a
      blob / manifest (status, headers and length unchanged).
    - ``drop_patches``: for the next N PATCH requests, forward the headers and ``drop_fraction`` of the
      body to the registry (nothing at all when it is 0), then close both connections without an answer:
      an upload interrupted mid-chunk.

    - ``paginate_tags``: answer ``GET /v2/<repo>/tags/list?n=&last=`` one page at a time with a
      ``Link: <...>; rel="next"`` header, as distribution v3 does (2.8.2 ignores ``n``); the tags come
      from the registry.

    The client's Host header is forwarded, so the registry's Location headers point back at the proxy.
    `requests` records (method, path) of each request.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.tamper_blobs = False
        self.tamper_manifests = False
        self.drop_patches = 0
        self.drop_fraction = 0.5
        self.paginate_tags = False
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> TamperProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def take_drop(self) -> bool:
        with self.lock:
            if self.drop_patches > 0:
                self.drop_patches -= 1
                return True
            return False


def _proxy_handler(proxy: TamperProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _hang_up(self) -> None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _forward(self) -> None:
            method = self.command
            proxy.requests.append((method, self.path))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urllib.parse.urlsplit(self.path).path
            forward_path = path if proxy.paginate_tags and path.endswith("/tags/list") else self.path
            drop = method == "PATCH" and proxy.take_drop()
            if drop and proxy.drop_fraction == 0:
                self._hang_up()
                return
            upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
            upstream.putrequest(method, forward_path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders()
            if drop:
                upstream.send(body[: int(len(body) * proxy.drop_fraction)])
                time.sleep(0.2)  # let the registry read what it got before the connection goes
                upstream.close()
                self._hang_up()
                return
            if body:
                upstream.send(body)
            response = upstream.getresponse()
            data = response.read()
            extra: list[tuple[str, str]] = []
            if method == "GET" and response.status == 200 and proxy.paginate_tags and path.endswith("/tags/list"):
                data, extra = _page(data, path, urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
            if method == "GET" and response.status == 200 and data:
                if (proxy.tamper_blobs and "/blobs/sha256:" in path) or (
                    proxy.tamper_manifests and "/manifests/" in path
                ):
                    i = len(data) // 2
                    data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and (name.lower() != "content-length" or method == "HEAD"):
                    self.send_header(name, value)
            for name, value in extra:
                self.send_header(name, value)
            if method != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815

    return Handler


def _page(data: bytes, path: str, query: dict[str, list[str]]) -> tuple[bytes, list[tuple[str, str]]]:
    doc = json.loads(data)
    tags = sorted(doc.get("tags") or [])
    n = int(query.get("n", ["100"])[0])
    last = query.get("last", [""])[0]
    rest = [t for t in tags if t > last]
    page, more = rest[:n], rest[n:]
    headers = []
    if more:
        following = f"{path}?{urllib.parse.urlencode({'n': n, 'last': page[-1]})}"
        headers.append(("Link", f'<{following}>; rel="next"'))
    return json.dumps({"name": doc.get("name"), "tags": page}).encode(), headers
