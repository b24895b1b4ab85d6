"""registry.copy: images with their cosign attachments and referrers between an OCI layout and real
registries (Debian's docker-registry on loopback), digests unchanged end to end."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from registry import attachments
from registry.attachments import ATT, CYCLONEDX_PREDICATE, SBOM, SIG, attachment_tag
from registry.copy import LayoutStore, RemoteStore, copy
from registry.distribution import OCI_INDEX, OCI_MANIFEST, RegistryClient, referrer_descriptor, referrers_tag
from registry.errors import ManifestUnknownError
from registry.keys import generate_key_pair, load_private_key
from registry.oci import Entry, Image, Layer
from registry.oci.errors import BlobVerificationError
from registry.oci.image import sha256_digest
from registry.oci.layout import list_refs, read_attachment, read_layout, write_attachment, write_layout
from tests.registry_server import RegistryServer, TamperProxy, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

REPO = "llmctl/demo"
EMPTY = b"{}"
SBOM_DOC = b'{"bomFormat":"CycloneDX","specVersion":"1.6"}'
KINDS = (SIG, ATT, SBOM)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
def client(registry: RegistryServer) -> Iterator[RegistryClient]:
    with RegistryClient(registry.host, plain_http=True) as c:
        yield c


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    pair = generate_key_pair(b"pw")
    return load_private_key(pair.private_pem, b"pw")


@dataclass
class Signed:
    layout: Path
    image: Image
    referrer: str  # digest of the SBOM referrer manifest


def build_image(tmp: Path, seed: bytes) -> Image:
    base = Layer.from_entries([Entry.file("etc/base.txt", data=b"base " + seed)], tmp / "layers")
    weights = Layer.from_entries([Entry.file("model/weights.bin", data=os.urandom(200_000))], tmp / "layers")
    return Image.empty().with_layer(base).with_layer(weights).with_config(cmd=["serve"])


def referrer_manifest(subject: Image) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.cyclonedx+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(EMPTY), "size": 2},
            "layers": [
                {
                    "mediaType": "application/vnd.cyclonedx+json",
                    "digest": sha256_digest(SBOM_DOC),
                    "size": len(SBOM_DOC),
                }
            ],
            "subject": subject.manifest_descriptor(),
        },
        separators=(",", ":"),
    ).encode()


def signed_layout(tmp: Path, key: ec.EllipticCurvePrivateKey, tag: str = "1.0.0") -> Signed:
    """A layout with an image `llmctl/demo:<tag>`, its .sig/.att/.sbom and one referrer (fallback index)."""
    layout = tmp / "src-layout"
    image = build_image(tmp, tag.encode())
    write_layout(layout, image, f"{REPO}:{tag}")
    made = {
        SIG: attachments.sign(image.digest, f"registry.internal:5000/{REPO}", key, None),
        ATT: attachments.attest(image.digest, REPO, CYCLONEDX_PREDICATE, {"bomFormat": "CycloneDX"}, key),
        SBOM: attachments.sbom_blob(SBOM_DOC),
    }
    for kind, blob in made.items():
        write_attachment(layout, attachments.add(None, blob), f"{REPO}:{attachment_tag(image.digest, kind)}")
    store = LayoutStore(layout, REPO)
    store.put_blob(sha256_digest(EMPTY), 2, EMPTY)
    store.put_blob(sha256_digest(SBOM_DOC), len(SBOM_DOC), SBOM_DOC)
    manifest = referrer_manifest(image)
    store.put_manifest(manifest, OCI_MANIFEST)
    store.add_referrers(image.digest, [referrer_descriptor(manifest, OCI_MANIFEST)])
    return Signed(layout, image, sha256_digest(manifest))


def blob_files(layout: Path) -> list[str]:
    return sorted(os.listdir(layout / "blobs" / "sha256"))


def test_layout_to_registry_to_mirror_to_layout(
    client: RegistryClient, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    signed = signed_layout(tmp_path, key)
    image = signed.image
    src = LayoutStore(signed.layout, REPO)
    tags = [attachment_tag(image.digest, kind) for kind in KINDS] + [referrers_tag(image.digest)]
    n_manifests = 6  # image, three attachments, the referrer, the fallback index
    n_blobs = len(blob_files(signed.layout)) - n_manifests

    pushed = copy(src, "1.0.0", RemoteStore(client, "llm/demo"))
    assert pushed.digest == image.digest
    assert (pushed.blobs_copied, pushed.blobs_skipped, pushed.blobs_mounted) == (n_blobs, 0, 0)
    assert pushed.attachments == tags
    assert client.head_manifest("llm/demo", "1.0.0") == image.digest

    again = copy(src, "1.0.0", RemoteStore(client, "llm/demo"))  # everything is there: HEAD skips
    assert (again.blobs_copied, again.blobs_mounted) == (0, 0)

    mirrored = copy(RemoteStore(client, "llm/demo"), "1.0.0", RemoteStore(client, "mirror/demo"), "stable")
    assert mirrored.digest == image.digest
    assert (mirrored.blobs_copied, mirrored.blobs_mounted) == (0, n_blobs)  # same registry: mounted
    assert sorted(client.list_tags("mirror/demo")) == sorted(["stable", *tags])

    pulled_root = tmp_path / "pulled"
    seen: dict[str, int] = {}
    pulled = copy(
        RemoteStore(client, "mirror/demo"),
        "stable",
        LayoutStore(pulled_root, "pulled/demo"),
        "1.0.0",
        progress=lambda digest, done, total: seen.__setitem__(digest, done),
    )
    assert pulled.digest == image.digest and pulled.blobs_copied == n_blobs
    assert seen[image.layers[1].digest] == image.layers[1].size
    # identical bytes: the same blob set, the image reads back verified (digests, sizes, diff_ids)
    assert blob_files(pulled_root) == blob_files(signed.layout)
    assert read_layout(pulled_root, "pulled/demo:1.0.0").digest == image.digest
    public = [key.public_key()]
    for kind in KINDS:
        tag = attachment_tag(image.digest, kind)
        original = read_attachment(signed.layout, f"{REPO}:{tag}")
        copied = read_attachment(pulled_root, f"pulled/demo:{tag}")
        assert original is not None and copied is not None and copied.digest == original.digest
    sig = read_attachment(pulled_root, f"pulled/demo:{attachment_tag(image.digest, SIG)}")
    attachments.verify_signatures(sig, public, image.digest, "pulled")
    att = read_attachment(pulled_root, f"pulled/demo:{attachment_tag(image.digest, ATT)}")
    assert CYCLONEDX_PREDICATE in attachments.verify_attestations(att, public, image.digest, "pulled")
    assert [d["digest"] for d in LayoutStore(pulled_root, "pulled/demo").referrers(image.digest)] == [signed.referrer]
    assert [d["digest"] for d in client.referrers("mirror/demo", image.digest)] == [signed.referrer]


def test_pull_by_digest_into_a_layout_named_with_the_registry(
    registry: RegistryServer, client: RegistryClient, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    """llmctl's local store names pulled images with their registry: `127.0.0.1:<port>/llm/demo`."""
    signed = signed_layout(tmp_path, key, "4.0.0")
    digest = signed.image.digest
    copy(LayoutStore(signed.layout, REPO), "4.0.0", RemoteStore(client, "t/bydigest"))
    root, name = tmp_path / "store", f"{registry.host}/t/bydigest"
    store = LayoutStore(root, name)
    result = copy(RemoteStore(client, "t/bydigest"), digest, store)
    assert result.digest == digest
    refs = list_refs(root)
    assert f"{name}@{digest}" in refs and f"{name}:{attachment_tag(digest, SIG)}" in refs
    assert read_layout(root, f"{name}@{digest}").digest == digest
    assert store.resolve(digest) == digest and attachment_tag(digest, SIG) in store.tags()
    assert store.untag(digest) is True and store.untag(digest) is False
    assert f"{name}@{digest}" not in list_refs(root)


def test_index_is_copied_recursively(client: RegistryClient, tmp_path: Path) -> None:
    layout = tmp_path / "multi"
    images = [build_image(tmp_path / name, name.encode()) for name in ("amd64", "arm64")]
    for i, image in enumerate(images):
        write_layout(layout, image, f"{REPO}:part{i}")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**image.manifest_descriptor(), "platform": {"os": "linux", "architecture": arch}}
                for image, arch in zip(images, ("amd64", "arm64"), strict=True)
            ],
        }
    ).encode()
    src = LayoutStore(layout, REPO)
    index_digest = src.put_manifest(index, OCI_INDEX, "multi")

    result = copy(src, "multi", RemoteStore(client, "t/multi"), attachments=False)
    assert result.digest == index_digest and result.attachments == []
    data, media_type, digest = client.get_manifest("t/multi", "multi")
    assert (data, media_type, digest) == (index, OCI_INDEX, index_digest)
    for image in images:
        assert client.head_manifest("t/multi", image.digest) == image.digest

    back = tmp_path / "back"
    assert copy(RemoteStore(client, "t/multi"), "multi", LayoutStore(back, "x/y")).digest == index_digest
    assert sorted(blob_files(back)) == sorted(blob_files(layout))
    assert list_refs(back) == ["x/y:multi"]


def test_copy_between_registries_streams(
    registry: RegistryServer, client: RegistryClient, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    signed = signed_layout(tmp_path, key, "2.0.0")
    copy(LayoutStore(signed.layout, REPO), "2.0.0", RemoteStore(client, "t/cross"))
    with RegistryServer(tmp_path / "second") as second, RegistryClient(second.host, plain_http=True) as other:
        result = copy(RemoteStore(client, "t/cross"), "2.0.0", RemoteStore(other, "t/cross"))
        assert result.digest == signed.image.digest and result.blobs_copied > 0 and result.blobs_mounted == 0
        assert len(result.attachments) == 4
        assert other.head_manifest("t/cross", "2.0.0") == signed.image.digest
        assert other.get_blob("t/cross", signed.image.layers[1].digest) == signed.image.layers[1].path.read_bytes()


def test_referrers_merge_into_an_existing_index(
    client: RegistryClient, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    signed = signed_layout(tmp_path, key, "3.0.0")
    src = LayoutStore(signed.layout, REPO)
    copy(src, "3.0.0", RemoteStore(client, "t/merge"), attachments=False)
    # the destination already lists another referrer of the same image
    note = b"a note"
    client.push_blob("t/merge", sha256_digest(EMPTY), 2, EMPTY)
    client.push_blob("t/merge", sha256_digest(note), len(note), note)
    other = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "text/plain",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(EMPTY), "size": 2},
            "layers": [{"mediaType": "text/plain", "digest": sha256_digest(note), "size": len(note)}],
            "subject": signed.image.manifest_descriptor(),
        }
    ).encode()
    other_digest = client.push_referrer("t/merge", other, OCI_MANIFEST)

    result = copy(src, "3.0.0", RemoteStore(client, "t/merge"))
    assert result.referrers == [signed.referrer]
    assert referrers_tag(signed.image.digest) not in result.attachments
    listed = [d["digest"] for d in client.referrers("t/merge", signed.image.digest)]
    assert listed == [other_digest, signed.referrer]


def test_tampered_blob_is_not_written_to_the_layout(
    registry: RegistryServer, client: RegistryClient, tmp_path: Path
) -> None:
    image = build_image(tmp_path, b"tamper")
    layout = tmp_path / "src"
    write_layout(layout, image, f"{REPO}:1")
    copy(LayoutStore(layout, REPO), "1", RemoteStore(client, "t/tamper"))
    dest = tmp_path / "dest"
    with TamperProxy(registry.port) as proxy, RegistryClient(proxy.host, plain_http=True) as c:
        proxy.tamper_blobs = True
        with pytest.raises(BlobVerificationError) as e:
            copy(RemoteStore(c, "t/tamper"), "1", LayoutStore(dest, REPO))
    assert "\n" not in str(e.value)
    assert blob_files(dest) == [] and not (dest / "index.json").exists()  # no blob, no temp file, no name


def test_layout_store_refuses_a_source_that_is_not_the_blob(tmp_path: Path) -> None:
    store = LayoutStore(tmp_path / "l", REPO)
    data = b"the right bytes"
    with pytest.raises(BlobVerificationError):
        store.put_blob(sha256_digest(data), len(data), b"the wrong bytes")
    assert blob_files(tmp_path / "l") == []
    assert store.put_blob(sha256_digest(data), len(data), data) == "uploaded"
    assert store.put_blob(sha256_digest(data), len(data), data) == "exists"
    assert store.get_blob(sha256_digest(data), len(data)) == data


def test_unknown_source_reference(client: RegistryClient, tmp_path: Path) -> None:
    with pytest.raises(ManifestUnknownError, match="nope"):
        copy(RemoteStore(client, "t/absent"), "nope", LayoutStore(tmp_path / "x", REPO))
    with pytest.raises(ManifestUnknownError):
        copy(LayoutStore(tmp_path / "empty", REPO), "1.0.0", RemoteStore(client, "t/absent"))
