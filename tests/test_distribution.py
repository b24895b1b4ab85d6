"""registry.reference, registry.credentials and registry.distribution against a real registry.

Every registry here is Debian's docker-registry (distribution 2.8.2) on loopback (tests/registry_server.py):
plain HTTP, TLS with a test CA, htpasswd Basic auth, and token auth with a token server the test runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.credentials import Credentials, CredentialStore
from registry.distribution import OCI_INDEX, OCI_MANIFEST, RegistryClient, referrers_tag, sha256_digest
from registry.errors import (
    BlobUnknownError,
    CredentialsError,
    InvalidReferenceError,
    ManifestUnknownError,
    RegistryAuthError,
    RegistryTLSError,
    RegistryUnavailableError,
)
from registry.oci import Entry, Image, Layer
from registry.oci.errors import BlobVerificationError
from registry.oci.layout import blob_path, write_layout
from registry.reference import LayoutReference, Reference, parse, parse_remote
from tests.netutil import free_port
from tests.registry_server import RegistryServer, TamperProxy, TokenServer, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

EMPTY_CONFIG = b"{}"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def client(registry: RegistryServer) -> Iterator[RegistryClient]:
    with RegistryClient(registry.host, plain_http=True) as c:
        yield c


def build_image(tmp: Path, payload: bytes, name: str = "model/weights.bin") -> Image:
    layer = Layer.from_entries([Entry.file(name, data=payload)], tmp / "layers")
    return Image.empty().with_layer(layer, created_by="test")


def push_image(client: RegistryClient, repo: str, image: Image, tag: str) -> str:
    for layer in image.layers:
        client.push_blob(repo, layer.digest, layer.size, layer.path)
    client.push_blob(repo, image.config_digest, len(image.config_bytes()), image.config_bytes())
    return client.put_manifest(repo, tag, image.manifest_bytes(), OCI_MANIFEST)


def sbom_referrer(
    client: RegistryClient,
    repo: str,
    subject: Image,
    document: bytes,
    artifact_type: str = "application/vnd.cyclonedx+json",
) -> bytes:
    """An OCI 1.1 artifact manifest (empty config) about `subject`, its blobs pushed."""
    client.push_blob(repo, sha256_digest(EMPTY_CONFIG), 2, EMPTY_CONFIG)
    client.push_blob(repo, sha256_digest(document), len(document), document)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": sha256_digest(EMPTY_CONFIG), "size": 2},
        "layers": [
            {"mediaType": "application/vnd.cyclonedx+json", "digest": sha256_digest(document), "size": len(document)}
        ],
        "subject": subject.manifest_descriptor(),
        "annotations": {"org.opencontainers.image.created": "1970-01-01T00:00:00Z"},
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text
    return text


# -- references -----------------------------------------------------------------------------------


def test_parse_registry_references() -> None:
    ref = parse_remote("registry.internal:5000/llm/starcoder2:1.0.0")
    assert ref == Reference("registry.internal:5000", "llm/starcoder2", "1.0.0", None)
    assert (ref.name, ref.ref, str(ref)) == (
        "registry.internal:5000/llm/starcoder2",
        "1.0.0",
        "registry.internal:5000/llm/starcoder2:1.0.0",
    )
    digest = "sha256:" + "ab" * 32
    pinned = parse_remote(f"localhost:5055/x@{digest}")
    assert (pinned.registry, pinned.repository, pinned.tag, pinned.digest, pinned.ref) == (
        "localhost:5055",
        "x",
        None,
        digest,
        digest,
    )
    both = parse_remote(f"127.0.0.1:5000/a/b:v1@{digest}")
    assert both.ref == digest and str(both) == f"127.0.0.1:5000/a/b:v1@{digest}"
    assert parse_remote("localhost/x").ref == "latest"
    assert parse_remote("llm/demo:1", default_registry="reg.internal").name == "reg.internal/llm/demo"
    assert parse_remote("reg.internal/llm/demo").with_tag("2").with_digest(digest).ref == digest


@pytest.mark.parametrize(
    "text",
    [
        "",
        "llm/demo:1.0.0",  # no registry and no default
        "reg.internal:5000/LLM/demo",  # uppercase repository
        "reg.internal:5000/llm/demo:-bad",
        "reg.internal:5000/llm/demo@sha256:abc",
        "reg.internal:5000/llm//demo",
        "reg internal/llm",
    ],
)
def test_parse_refuses_malformed_references(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as e:
        parse(text)
    one_line(e.value)


def test_parse_layout_references() -> None:
    ref = parse("oci-layout:/srv/images:llmctl/demo:1.0.0")
    assert isinstance(ref, LayoutReference)
    assert (ref.path, ref.ref_name, ref.repository, ref.tag) == (
        Path("/srv/images"),
        "llmctl/demo:1.0.0",
        "llmctl/demo",
        "1.0.0",
    )
    assert str(ref) == "oci-layout:/srv/images:llmctl/demo:1.0.0"
    whole = parse("oci-layout:relative/dir")
    assert whole == LayoutReference(Path("relative/dir"), None)
    digest = "sha256:" + "cd" * 32
    pinned = parse(f"oci-layout:/x:llmctl/demo@{digest}")
    assert isinstance(pinned, LayoutReference) and (pinned.repository, pinned.tag) == ("llmctl/demo", digest)
    for bad in ("oci-layout:", "oci-layout:/x:"):
        with pytest.raises(InvalidReferenceError):
            parse(bad)


# -- credentials ----------------------------------------------------------------------------------


def test_credential_store_file_is_private_and_round_trips(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "cfg" / "auth.json", use_docker_config=False)
    assert store.get("reg.internal:5000") is None
    store.login("https://reg.internal:5000/v2/", "alice", "s3cret:with:colons")
    path = tmp_path / "cfg" / "auth.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"auths": {"reg.internal:5000": {"auth": base64.b64encode(b"alice:s3cret:with:colons").decode()}}}
    creds = store.get("reg.internal:5000")
    assert creds == Credentials("alice", "s3cret:with:colons")
    assert "s3cret" not in repr(creds) and "s3cret" not in repr(store)
    store.login("reg.internal:5000", "bob", "pw2")  # replaces
    assert store.get("REG.internal:5000") == Credentials("bob", "pw2")
    assert store.registries() == ["reg.internal:5000"]
    assert store.logout("reg.internal:5000") is True
    assert store.logout("reg.internal:5000") is False
    assert store.get("reg.internal:5000") is None

    store.login("reg.internal:5000", "alice", "pw")
    os.chmod(path, 0o644)
    with pytest.raises(CredentialsError, match="chmod 600") as e:
        store.get("reg.internal:5000")
    assert "pw" not in one_line(e.value).replace(str(path), "")


def test_docker_config_fallback_and_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    config = {
        "auths": {
            "https://a.internal:5000": {"auth": base64.b64encode(b"ann:pa").decode()},
            "b.internal": {"username": "bea", "password": "pb"},
            "c.internal": {},
        },
        "credsStore": "llmctltest",
        "credHelpers": {"d.internal": "missinghelper"},
    }
    (docker_dir / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-llmctltest"
    helper.write_text(
        "#!/bin/sh\n"
        'read host\nif [ "$1" = get ] && [ "$host" = c.internal ]; then\n'
        '  echo \'{"ServerURL":"c.internal","Username":"cid","Secret":"pc"}\'\n'
        "else echo 'credentials not found in native keychain'; exit 1; fi\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    store = CredentialStore(tmp_path / "llmctl" / "auth.json")
    assert store.get("a.internal:5000") == Credentials("ann", "pa")
    assert store.get("b.internal") == Credentials("bea", "pb")
    assert store.get("c.internal") == Credentials("cid", "pc")  # credsStore, run as a real helper
    assert store.get("unknown.internal") is None
    with pytest.raises(CredentialsError, match="docker-credential-missinghelper") as e:
        store.get("d.internal")
    one_line(e.value)
    store.login("a.internal:5000", "own", "po")  # llmctl's file wins over Docker's
    assert store.get("a.internal:5000") == Credentials("own", "po")


# -- the client: basics ---------------------------------------------------------------------------


def test_ping_and_unreachable_registry(client: RegistryClient) -> None:
    client.ping()
    with RegistryClient(f"127.0.0.1:{free_port()}", plain_http=True, timeout=5) as dead:
        with pytest.raises(RegistryUnavailableError) as e:
            dead.ping()
    assert "127.0.0.1" in one_line(e.value)


def test_plain_http_only_to_loopback() -> None:
    with pytest.raises(RegistryTLSError, match="--insecure"):
        RegistryClient("registry.example:5000", plain_http=True)
    RegistryClient("registry.example:5000", plain_http=True, insecure=True).close()
    RegistryClient("localhost:5000", plain_http=True).close()
    with pytest.raises(InvalidReferenceError, match="host"):
        RegistryClient("https://registry.example:5000")


def test_push_pull_image_from_layout_same_digests(client: RegistryClient, tmp_path: Path) -> None:
    image = build_image(tmp_path, os.urandom(300_000))
    layout = tmp_path / "layout"
    write_layout(layout, image, "llmctl/demo:1.0.0")
    layer = image.layers[0]

    assert client.push_blob("t/push", layer.digest, layer.size, blob_path(layout, layer.digest)) == "uploaded"
    assert client.push_blob("t/push", layer.digest, layer.size, blob_path(layout, layer.digest)) == "exists"
    config = image.config_bytes()
    assert client.push_blob("t/push", image.config_digest, len(config), config) == "uploaded"
    digest = client.put_manifest("t/push", "1.0.0", image.manifest_bytes(), OCI_MANIFEST)
    assert digest == image.digest

    assert client.head_manifest("t/push", "1.0.0") == image.digest
    data, media_type, got = client.get_manifest("t/push", "1.0.0")
    assert (data, media_type, got) == (image.manifest_bytes(), OCI_MANIFEST, image.digest)
    assert client.get_manifest("t/push", image.digest)[2] == image.digest
    dest = tmp_path / "pulled" / "layer.tar.gz"
    assert client.get_blob("t/push", layer.digest, dest, size=layer.size) == dest
    assert dest.read_bytes() == layer.path.read_bytes()
    assert client.get_blob("t/push", image.config_digest) == config
    assert client.list_tags("t/push") == ["1.0.0"]


def test_cross_repository_mount(client: RegistryClient) -> None:
    data = os.urandom(50_000)
    digest = sha256_digest(data)
    assert client.push_blob("t/mount-src", digest, len(data), data) == "uploaded"
    assert client.push_blob("t/mount-dst", digest, len(data), data, mount_from="t/mount-src") == "mounted"
    assert client.blob_exists("t/mount-dst", digest)
    other = os.urandom(1000)  # not in the source repository: the 202 session is used to upload it
    result = client.push_blob("t/mount-dst", sha256_digest(other), len(other), other, mount_from="t/mount-src")
    assert result == "uploaded"
    assert client.get_blob("t/mount-dst", sha256_digest(other)) == other


def test_unknown_manifest_and_blob(client: RegistryClient) -> None:
    with pytest.raises(ManifestUnknownError) as e:
        client.get_manifest("t/none", "nope")
    assert "/v2/t/none/manifests/nope" in one_line(e.value) and e.value.status == 404
    assert client.head_manifest("t/none", "nope") is None
    with pytest.raises(BlobUnknownError):
        client.get_blob("t/none", "sha256:" + "0" * 64)
    assert client.blob_exists("t/none", "sha256:" + "0" * 64) is False
    assert client.list_tags("t/none") == []


def test_list_tags_follows_pagination(registry: RegistryServer, client: RegistryClient) -> None:
    client.push_blob("t/tags", sha256_digest(EMPTY_CONFIG), 2, EMPTY_CONFIG)
    tags = [f"v{i}" for i in range(5)]
    for i, tag in enumerate(tags):
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": sha256_digest(EMPTY_CONFIG), "size": 2},
                "layers": [],
                "annotations": {"n": str(i)},
            }
        ).encode()
        client.put_manifest("t/tags", tag, manifest, OCI_MANIFEST)
    assert sorted(client.list_tags("t/tags")) == tags
    # distribution 2.8.2 ignores `n`; the proxy pages its answer like distribution v3 (Link: rel="next")
    with TamperProxy(registry.port) as proxy, RegistryClient(proxy.host, plain_http=True) as c:
        proxy.paginate_tags = True
        assert c.list_tags("t/tags", page_size=2) == tags
        assert [p for m, p in proxy.requests] == [
            "/v2/t/tags/tags/list?n=2",
            "/v2/t/tags/tags/list?n=2&last=v1",
            "/v2/t/tags/tags/list?n=2&last=v3",
        ]


# -- uploads: chunked, resumed, verified ----------------------------------------------------------


def test_chunked_upload_resumes_from_status(client: RegistryClient, tmp_path: Path) -> None:
    data = os.urandom(700_000)
    digest = sha256_digest(data)
    source = tmp_path / "blob"
    source.write_bytes(data)
    # another process sent the first chunk and stopped; resume_upload asks the registry where it is
    location = client.start_upload("t/resume")
    location = client.upload_chunk("t/resume", location, 0, data[:250_000])
    seen: list[int] = []
    assert (
        client.resume_upload("t/resume", location, digest, len(data), source, chunk_size=200_000, progress=seen.append)
        == "uploaded"
    )
    assert seen[0] == 450_000 and seen[-1] == len(data)
    assert client.get_blob("t/resume", digest) == data


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_upload_survives_a_dropped_patch(registry: RegistryServer, fraction: float) -> None:
    """fraction 0: the registry saw nothing of the broken PATCH, the upload continues where its status
    says. fraction 0.5: distribution wrote half a chunk and cancels the session on the next request;
    the client starts a new session and sends the blob again."""
    data = os.urandom(600_000)
    digest = sha256_digest(data)
    with TamperProxy(registry.port) as proxy, RegistryClient(proxy.host, plain_http=True) as c:
        proxy.drop_patches = 1
        proxy.drop_fraction = fraction
        repo = f"t/drop{int(fraction * 10)}"
        assert c.push_blob(repo, digest, len(data), data, chunk_size=200_000) == "uploaded"
        methods = [m for m, _ in proxy.requests]
        assert methods.count("PATCH") == 4  # three chunks plus the one that was dropped
        status_checks = [p for m, p in proxy.requests if m == "GET" and "/blobs/uploads/" in p]
        assert len(status_checks) == 1
        assert methods.count("POST") == (1 if fraction == 0 else 2)
        assert c.get_blob(repo, digest) == data


def test_source_that_does_not_match_its_digest_is_not_committed(client: RegistryClient) -> None:
    data = os.urandom(300_000)
    wrong = sha256_digest(b"something else")
    for chunk_size in (1 << 20, 100_000):  # monolithic, chunked
        with pytest.raises(BlobVerificationError) as e:
            client.push_blob("t/wrong", wrong, len(data), data, chunk_size=chunk_size)
        assert wrong in one_line(e.value)
        assert not client.blob_exists("t/wrong", wrong)
        assert not client.blob_exists("t/wrong", sha256_digest(data))
    with pytest.raises(BlobVerificationError):
        client.push_blob("t/wrong", sha256_digest(data), len(data) + 1, data)


def test_tampered_blob_and_manifest_are_refused(
    registry: RegistryServer, client: RegistryClient, tmp_path: Path
) -> None:
    image = build_image(tmp_path, os.urandom(100_000))
    push_image(client, "t/tamper", image, "1")
    layer = image.layers[0]
    with TamperProxy(registry.port) as proxy, RegistryClient(proxy.host, plain_http=True) as c:
        proxy.tamper_blobs = True
        dest = tmp_path / "out" / "layer"
        with pytest.raises(BlobVerificationError) as e:
            c.get_blob("t/tamper", layer.digest, dest, size=layer.size)
        message = one_line(e.value)
        assert layer.digest in message and "/v2/t/tamper/blobs/" in message
        assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial or temporary file
        with pytest.raises(BlobVerificationError):
            c.get_blob("t/tamper", image.config_digest)
        proxy.tamper_blobs, proxy.tamper_manifests = False, True
        with pytest.raises(BlobVerificationError, match=image.digest):
            c.get_manifest("t/tamper", image.digest)
        with pytest.raises(BlobVerificationError, match="arrived with digest"):
            c.get_manifest("t/tamper", "1")  # by tag: checked against Docker-Content-Digest


# -- referrers (distribution 2.8.2 has no referrers API: the tag-schema fallback) -----------------


def test_referrers_fallback_index(client: RegistryClient, tmp_path: Path) -> None:
    image = build_image(tmp_path, os.urandom(10_000))
    push_image(client, "t/refs", image, "1")
    assert client.referrers("t/refs", image.digest) == []
    sbom = sbom_referrer(client, "t/refs", image, b'{"bomFormat":"CycloneDX"}')
    sbom_digest = client.push_referrer("t/refs", sbom, OCI_MANIFEST)
    assert client.supports_referrers_api("t/refs", image.digest) is False

    found = client.referrers("t/refs", image.digest)
    assert found == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sbom_digest,
            "size": len(sbom),
            "artifactType": "application/vnd.cyclonedx+json",
            "annotations": {"org.opencontainers.image.created": "1970-01-01T00:00:00Z"},
        }
    ]
    other = sbom_referrer(client, "t/refs", image, b'{"bomFormat":"CycloneDX","version":2}', "application/vnd.x+json")
    other_digest = client.push_referrer("t/refs", other, OCI_MANIFEST)
    client.push_referrer("t/refs", sbom, OCI_MANIFEST)  # already listed: the index is unchanged
    assert [d["digest"] for d in client.referrers("t/refs", image.digest)] == [sbom_digest, other_digest]
    assert [d["digest"] for d in client.referrers("t/refs", image.digest, "application/vnd.x+json")] == [other_digest]
    index, media_type, _ = client.get_manifest("t/refs", referrers_tag(image.digest))
    assert media_type == OCI_INDEX and json.loads(index)["mediaType"] == OCI_INDEX


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("tls-registry"), tls=True) as server:
        yield server


def test_tls_with_ca_file_without_and_insecure(tls_registry: RegistryServer) -> None:
    assert tls_registry.ca_file is not None
    with RegistryClient(tls_registry.host, ca_file=tls_registry.ca_file) as c:
        c.ping()
        data = b"over tls"
        assert c.push_blob("t/tls", sha256_digest(data), len(data), data) == "uploaded"
    with RegistryClient(tls_registry.host) as c, pytest.raises(RegistryTLSError) as e:
        c.ping()
    message = one_line(e.value)
    assert "--ca-file" in message and "unknown CA" in message
    with RegistryClient(tls_registry.host, insecure=True) as c:
        assert c.get_blob("t/tls", sha256_digest(b"over tls")) == b"over tls"
    with pytest.raises(RegistryTLSError, match="does not exist"):
        RegistryClient(tls_registry.host, ca_file=tls_registry.workdir / "missing.pem")


# -- Basic auth -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("basic-registry"), users={"alice": "correct horse"}) as server:
        yield server


def test_basic_auth(basic_registry: RegistryServer) -> None:
    with RegistryClient(basic_registry.host, plain_http=True, credentials=Credentials("alice", "correct horse")) as c:
        c.ping()
        assert c.push_blob("t/basic", sha256_digest(b"x"), 1, b"x") == "uploaded"
        assert c.get_blob("t/basic", sha256_digest(b"x")) == b"x"
    with RegistryClient(basic_registry.host, plain_http=True, credentials=Credentials("alice", "wrong")) as c:
        with pytest.raises(RegistryAuthError) as e:
            c.blob_exists("t/basic", sha256_digest(b"x"))
    message = one_line(e.value)
    assert basic_registry.host in message and "llmctl registry login" in message and "alice" in message
    assert "wrong" not in message
    with RegistryClient(basic_registry.host, plain_http=True) as c, pytest.raises(RegistryAuthError, match="log in"):
        c.ping()


# -- token auth -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server() -> TokenServer:
    return TokenServer({"alice": "pw"})


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("token-registry"), token=token_server) as server:
        yield server


@pytest.fixture
def fresh_tokens(token_server: TokenServer) -> Iterator[TokenServer]:
    token_server.requests.clear()
    yield token_server
    token_server.ttl, token_server.advertised_ttl, token_server.wrong_key = 300, None, False
    token_server.denied.clear()


def test_token_auth_scopes(token_registry: RegistryServer, fresh_tokens: TokenServer) -> None:
    with RegistryClient(token_registry.host, plain_http=True, credentials=Credentials("alice", "pw")) as c:
        c.ping()
        data = os.urandom(5000)
        digest = sha256_digest(data)
        assert c.push_blob("t/tok-a", digest, len(data), data) == "uploaded"
        assert c.push_blob("t/tok-b", digest, len(data), data, mount_from="t/tok-a") == "mounted"
        assert c.get_blob("t/tok-b", digest) == data
    scopes = [sorted(s) for user, s in fresh_tokens.requests]
    assert all(user == "alice" for user, _ in fresh_tokens.requests)
    assert ["repository:t/tok-a:pull,push"] in scopes
    assert ["repository:t/tok-a:pull", "repository:t/tok-b:pull,push"] in scopes  # the mount's scope union
    assert scopes.count(["repository:t/tok-b:pull"]) == 1  # cached: one token for both pulls


def test_mount_without_access_to_the_source_uploads(token_registry: RegistryServer, fresh_tokens: TokenServer) -> None:
    with RegistryClient(token_registry.host, plain_http=True, credentials=Credentials("alice", "pw")) as c:
        data = os.urandom(3000)
        digest = sha256_digest(data)
        c.push_blob("t/tok-private", digest, len(data), data)
        fresh_tokens.denied.add("t/tok-private")
        assert c.mount_blob("t/tok-c", digest, "t/tok-private") is False
        assert c.push_blob("t/tok-c", digest, len(data), data, mount_from="t/tok-private") == "uploaded"
        assert c.get_blob("t/tok-c", digest) == data


def test_expired_token_is_refreshed(token_registry: RegistryServer, fresh_tokens: TokenServer) -> None:
    """The token server claims an hour, the registry stops accepting the token after 2 s: the 401 that
    follows gets one fresh token and the request goes through."""
    fresh_tokens.ttl, fresh_tokens.advertised_ttl = 2, 3600
    with RegistryClient(token_registry.host, plain_http=True, credentials=Credentials("alice", "pw")) as c:
        data = b"refresh me"
        c.push_blob("t/tok-exp", sha256_digest(data), len(data), data)
        pulls = lambda: sum(s == ["repository:t/tok-exp:pull"] for _, s in fresh_tokens.requests)  # noqa: E731
        assert c.get_blob("t/tok-exp", sha256_digest(data)) == data
        assert pulls() == 1
        time.sleep(2.5)
        assert c.get_blob("t/tok-exp", sha256_digest(data)) == data
        assert pulls() == 2


def test_refused_tokens_and_passwords(token_registry: RegistryServer, fresh_tokens: TokenServer) -> None:
    fresh_tokens.wrong_key = True  # tokens the registry does not trust (a revoked signer)
    with RegistryClient(token_registry.host, plain_http=True, credentials=Credentials("alice", "pw")) as c:
        with pytest.raises(RegistryAuthError) as e:
            c.blob_exists("t/tok-bad", "sha256:" + "1" * 64)
    message = one_line(e.value)
    assert token_registry.host in message and "401" in message and "llmctl registry login" in message
    fresh_tokens.wrong_key = False
    with RegistryClient(token_registry.host, plain_http=True, credentials=Credentials("alice", "nope")) as c:
        with pytest.raises(RegistryAuthError) as e:
            c.ping()
    message = one_line(e.value)
    assert "token server" in message and "alice" in message and "nope" not in message
    with RegistryClient(token_registry.host, plain_http=True) as c:  # anonymous: a token without access
        with pytest.raises(RegistryAuthError, match="anonymous"):
            c.get_blob("t/tok-bad", "sha256:" + "1" * 64)


def test_digest_helpers() -> None:
    assert referrers_tag("sha256:" + "a" * 64) == "sha256-" + "a" * 64
    assert sha256_digest(b"") == "sha256:" + hashlib.sha256(b"").hexdigest()
