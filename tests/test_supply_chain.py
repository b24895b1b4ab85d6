"""Signed builds, `llmctl verify`, `llmctl policy check` and the tamper matrix.

One signed image is built per module; each test works on its own copy of the llmctl home (keys,
policy, the OCI layout with the image and its `.sig` / `.att` / `.sbom` attachments), changes one
thing the way an attacker or a bad disk would, and checks that verification refuses it with a
message that says what is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from manager import base_image, build, cli, images, keys, signing
from manager.build import BuildResult
from manager.model_image import MODELS_DIR
from registry import attachments, cosign
from registry.attachments import ATT, CYCLONEDX_PREDICATE, SBOM, SIG
from registry.oci import Entry, Image, Layer
from registry.oci.artifact import Attachment, Blob
from registry.oci.layout import REF_NAME, read_layout, write_layout
from runtime.testing.make_model import make_model

CACHE = Path.home() / ".cache" / "llmctl"
PASSWORD = "correct horse"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rootfs() -> Path:
    root, _ = base_image.cached_rootfs(CACHE / "base-rootfs", deb_cache=CACHE / "debs", allow_newer=True)
    return root


def write_manifest(directory: Path, *, name: str = "demo", license: str = "bigcode-openrail-m", seed: int = 7) -> Path:
    weights = make_model(directory / f"{name}.gguf", preset="tiny", wtype="q8_0", seed=seed)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    path = directory / f"{name}.yaml"
    path.write_text(
        "apiVersion: llmctl.dev/v1\nkind: Model\n"
        f"metadata: {{name: {name}, version: 1.0.0}}\n"
        f"spec:\n  files: [{{path: ./{name}.gguf, sha256: 'sha256:{digest}'}}]\n  license: {license}\n"
    )
    return path


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[tuple[Path, BuildResult]]:
    """A home with the default key and one signed image in its layout."""
    work = tmp_path_factory.mktemp("signed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMCTL_HOME", str(work / "home"))
        mp.setenv("LLMCTL_KEY_PASSWORD", PASSWORD)
        keys.generate()
        result = build.build(write_manifest(work), load=False, progress=False, base_rootfs=rootfs)
        yield work / "home", result


@pytest.fixture
def home(signed: tuple[Path, BuildResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own copy of the signed home (so tampering stays local to the test)."""
    copy = tmp_path / "home"
    shutil.copytree(signed[0], copy)
    monkeypatch.setenv("LLMCTL_HOME", str(copy))
    monkeypatch.setenv("LLMCTL_KEY_PASSWORD", PASSWORD)
    return copy


@pytest.fixture
def result(signed: tuple[Path, BuildResult]) -> BuildResult:
    return signed[1]


def verify_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err.strip()


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = verify_cli(capsys, *args)
    assert code == 1, out
    assert err.startswith("llmctl: error: ") and "\n" not in err
    return err


def ref(result: BuildResult) -> images.ImageRef:
    return images.resolve(result.tag)


def rewrite_attachment(result: BuildResult, kind: str, change: Callable[[Blob], Blob]) -> None:
    """Replace the first layer of an attachment with `change(layer)`, keeping the layout consistent
    (so only the cryptography can notice)."""
    r = ref(result)
    att = images.read(r, kind)
    assert att is not None
    images.write(r, kind, Attachment.of([change(att.layers[0]), *att.layers[1:]]))


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


def blob_path(home: Path, digest: str) -> Path:
    return home / "data" / "images" / "layout" / "blobs" / "sha256" / digest.split(":", 1)[1]


# --- what a good build gives -----------------------------------------------------------------------


def test_signed_build_verifies_with_key_policy_and_as_json(
    home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = home / "config" / "keys" / "cosign.pub"
    code, out, _ = verify_cli(capsys, "verify", result.tag, "--key", str(pub))
    assert code == 0
    assert f"digest: {result.digest}" in out and "weights in the image match the signed SBOM" in out
    code, out, _ = verify_cli(capsys, "policy", "check", result.digest, "-o", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["signer"] == result.signer and doc["license"] == "bigcode-openrail-m"
    assert doc["attestations"] == sorted([CYCLONEDX_PREDICATE, attachments.SLSA_PROVENANCE_V1])
    assert list(doc["weights"]) == [f"/{MODELS_DIR}/demo.gguf"]


def test_attachments_follow_cosign_tag_scheme_and_formats(home: Path, result: BuildResult) -> None:
    r = ref(result)
    hexdigest = result.digest.split(":", 1)[1]
    sig = images.read(r, SIG)
    assert sig is not None and images.attachment_ref(r, SIG) == f"llmctl/demo:sha256-{hexdigest}.sig"
    # the config cosign writes for one layer is 233 bytes (its SIGNATURE_SPEC example)
    assert len(sig.config) == 233
    layer = sig.layers[0]
    assert layer.media_type == cosign.SIMPLE_SIGNING_MEDIA_TYPE
    assert json.loads(layer.data)["critical"]["image"]["docker-manifest-digest"] == result.digest
    pub = keys.export("cosign")
    assert cosign.verify(layer.data, layer.annotations[cosign.SIGNATURE_ANNOTATION], _pub(pub), result.digest)
    att = images.read(r, ATT)
    assert att is not None
    assert {b.annotations["predicateType"] for b in att.layers} == {
        CYCLONEDX_PREDICATE,
        attachments.SLSA_PROVENANCE_V1,
    }
    sbom = images.read(r, SBOM)
    assert sbom is not None and json.loads(sbom.layers[0].data)["bomFormat"] == "CycloneDX"
    provenance = next(b for b in att.layers if b.annotations["predicateType"] == attachments.SLSA_PROVENANCE_V1)
    statement = json.loads(base64.b64decode(json.loads(provenance.data)["payload"]))
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    weights_digest = _stored(home, result).config_json()["config"]["Labels"]["dev.llmctl.model.weights.digest"]
    assert deps[0]["name"] == "demo.gguf" and "sha256:" + deps[0]["digest"]["sha256"] == weights_digest


def _pub(pem: bytes) -> Any:
    from registry.keys import load_public_key

    return load_public_key(pem)


# --- the tamper matrix -----------------------------------------------------------------------------


def test_flipped_byte_in_a_layer_blob_is_refused(
    home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = _stored(home, result)
    path = stored.layers[-1].path  # the runtime layer
    path.write_bytes(flip(path.read_bytes(), 100))
    assert "corrupt or was altered" in refused(capsys, "verify", result.tag)


def _stored(home: Path, result: BuildResult) -> Image:
    return read_layout(home / "data" / "images" / "layout", result.tag, check_diff_ids=False)


def test_flipped_byte_in_the_weights_layer_is_refused(
    home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _stored(home, result).layers[1].path
    data = path.read_bytes()
    path.write_bytes(flip(data, len(data) // 2))
    assert f"blob {_stored_digest(home, result, 1)}" in refused(capsys, "verify", result.tag)


def _stored_digest(home: Path, result: BuildResult, index: int) -> str:
    manifest = json.loads(blob_path(home, result.digest).read_bytes())
    return str(manifest["layers"][index]["digest"])


def _restitch(home: Path, result: BuildResult, tmp_path: Path, weights: Path) -> Image:
    """The image with its weights layer rebuilt from `weights`, written under the same name: every
    digest in the layout is consistent, only the signature can tell."""
    stored = _stored(home, result)
    layer = Layer.from_entries([Entry.file(f"{MODELS_DIR}/demo.gguf", weights, mode=0o444)], tmp_path / "blobs")
    image = Image(stored.config_file, (stored.layers[0], layer, stored.layers[2]))
    write_layout(home / "data" / "images" / "layout", image, result.tag)
    return image


def _swapped_weights(tmp_path: Path) -> Path:
    return make_model(tmp_path / "other.gguf", preset="tiny", wtype="q8_0", seed=99)


def test_swapped_weights_with_consistent_digests_fail_the_signature(
    home: Path, result: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _restitch(home, result, tmp_path, _swapped_weights(tmp_path))
    err = refused(capsys, "verify", result.tag)
    assert f"no signature (no sha256-{image.digest[7:]}.sig)" in err


def test_swapped_weights_signed_but_with_the_old_sbom_fail_the_content_check(
    home: Path, result: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A builder that signs an image whose SBOM lies about the weights is caught by comparing the
    SBOM's digests with the bytes in the image."""
    old = ref(result)
    att = images.read(old, ATT)
    assert att is not None
    old_sbom = next(
        json.loads(base64.b64decode(json.loads(b.data)["payload"]))["predicate"]
        for b in att.layers
        if b.annotations["predicateType"] == CYCLONEDX_PREDICATE
    )
    image = _restitch(home, result, tmp_path, _swapped_weights(tmp_path))
    new = images.ImageRef(result.tag, old.repository, image.digest)
    key = signing.load_signing_key(home / "config" / "keys" / "cosign.key")
    sig = attachments.sign(image.digest, new.repository, key, None)
    images.write(new, SIG, Attachment.of([sig]))
    images.write(new, ATT, Attachment.of([attachments.attest(image.digest, "x", CYCLONEDX_PREDICATE, old_sbom, key)]))
    err = refused(capsys, "verify", result.tag)
    assert "/models/demo.gguf in the image has sha256:" in err and "the weights were swapped" in err


def test_edited_manifest_is_refused(home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]) -> None:
    path = blob_path(home, result.digest)
    path.write_bytes(path.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    assert f"blob {result.digest}" in refused(capsys, "verify", result.tag)


def test_replaced_manifest_is_refused_by_the_signature(
    home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = _stored(home, result)
    edited = stored.with_annotations({"org.opencontainers.image.description": "not what was signed"})
    write_layout(home / "data" / "images" / "layout", edited, result.tag)
    # the old signature is still there, moved onto the new digest's tag by an attacker
    old, new = ref(result), images.resolve(result.tag)
    sig = images.read(images.ImageRef(result.tag, old.repository, result.digest), SIG)
    assert sig is not None and new.digest != result.digest
    images.write(new, SIG, sig)
    err = refused(capsys, "verify", result.tag)
    assert f"signs manifest {result.digest}, not {new.digest}" in err


def test_altered_signature_is_refused(home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]) -> None:
    def alter(layer: Blob) -> Blob:
        raw = base64.b64decode(layer.annotations[cosign.SIGNATURE_ANNOTATION])
        bad = base64.b64encode(flip(raw, len(raw) - 3)).decode()
        return Blob(layer.media_type, layer.data, {cosign.SIGNATURE_ANNOTATION: bad})

    rewrite_attachment(result, SIG, alter)
    assert "signature(s) verifies with the trusted key(s)" in refused(capsys, "verify", result.tag)


def test_altered_signature_payload_is_refused(
    home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite_attachment(
        result, SIG, lambda b: Blob(b.media_type, b.data.replace(b'"optional":null', b'"optional":{}'), b.annotations)
    )
    assert "signature(s) verifies" in refused(capsys, "verify", result.tag)


def _edit_statement(layer: Blob, change: Callable[[dict[str, Any]], None]) -> Blob:
    envelope = json.loads(layer.data)
    statement = json.loads(base64.b64decode(envelope["payload"]))
    change(statement)
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    return Blob(layer.media_type, json.dumps(envelope).encode(), layer.annotations)


def test_altered_sbom_is_refused(home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]) -> None:
    def lie(statement: dict[str, Any]) -> None:
        model = next(c for c in statement["predicate"]["components"] if c["type"] == "machine-learning-model")
        model["hashes"][0]["content"] = "0" * 64

    rewrite_attachment(result, ATT, lambda b: _edit_statement(b, lie))
    assert "an attestation" in (err := refused(capsys, "verify", result.tag)) and "was altered" in err


def test_altered_attestation_signature_is_refused(
    home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    def alter(layer: Blob) -> Blob:
        envelope = json.loads(layer.data)
        raw = base64.b64decode(envelope["signatures"][0]["sig"])
        envelope["signatures"][0]["sig"] = base64.b64encode(flip(raw, 20)).decode()
        return Blob(layer.media_type, json.dumps(envelope).encode(), layer.annotations)

    rewrite_attachment(result, ATT, alter)
    assert "verifies with none of the trusted key(s)" in refused(capsys, "verify", result.tag)


def test_flipped_byte_in_the_public_key_is_refused(
    home: Path, result: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = (home / "config" / "keys" / "cosign.pub").read_bytes()
    lines = pem.splitlines()
    body = base64.b64decode(b"".join(lines[1:-1]))
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"\n".join([lines[0], base64.b64encode(flip(body, len(body) - 5)), lines[-1]]) + b"\n")
    err = refused(capsys, "verify", result.tag, "--key", str(bad))
    assert str(bad) in err or "trusted key" in err


def test_wrong_key_is_refused(
    home: Path, result: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys.generate("other")
    other = home / "config" / "keys" / "other.pub"
    err = refused(capsys, "verify", result.tag, "--key", str(other))
    assert "none of its 1 signature(s) verifies with the trusted key(s)" in err


def test_unknown_key_in_the_policy_is_refused(
    home: Path, result: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: llmctl.dev/v1\nkind: TrustPolicy\nrules:\n  - repositories: ['*']\n    keys: [nobody]\n"
    )
    err = refused(capsys, "policy", "check", result.tag, "--policy", str(policy))
    assert "nobody" in err and str(policy) in err


def test_missing_signature_is_refused(home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]) -> None:
    index = home / "data" / "images" / "layout" / "index.json"
    doc = json.loads(index.read_text())
    doc["manifests"] = [m for m in doc["manifests"] if not m["annotations"][REF_NAME].endswith(".sig")]
    index.write_text(json.dumps(doc))
    assert "has no signature" in refused(capsys, "verify", result.tag)


def test_unsupported_key_type_is_refused(
    home: Path, result: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    err = refused(capsys, "verify", result.tag, "--key", str(rsa_pub))
    assert "RSA" in err and str(rsa_pub) in err


def test_missing_sbom_attestation_is_refused_when_the_policy_wants_one(
    home: Path, result: BuildResult, capsys: pytest.CaptureFixture[str]
) -> None:
    r = ref(result)
    att = images.read(r, ATT)
    assert att is not None
    kept = [b for b in att.layers if b.annotations["predicateType"] != CYCLONEDX_PREDICATE]
    images.write(r, ATT, Attachment.of(kept))
    assert "no signed CycloneDX SBOM attestation" in refused(capsys, "verify", result.tag)


# --- the policy at build time ----------------------------------------------------------------------


def test_build_refuses_a_licence_the_policy_does_not_allow(
    home: Path, rootfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (home / "config" / "policy.yaml").write_text(
        "apiVersion: llmctl.dev/v1\nkind: TrustPolicy\nrules:\n"
        "  - repositories: ['llmctl/*']\n    keys: [cosign]\n    allowedLicenses: [apache-2.0]\n"
    )
    manifest = write_manifest(tmp_path, name="restricted", license="bigcode-openrail-m")
    before = (home / "data" / "images" / "layout" / "index.json").read_bytes()
    err = refused(capsys, "build", str(manifest), "--no-load")
    assert "bigcode-openrail-m" in err and "apache-2.0" in err
    assert (home / "data" / "images" / "layout" / "index.json").read_bytes() == before  # nothing built


def test_build_without_a_key_is_refused_when_the_policy_wants_signatures(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, name="unsigned")
    err = refused(capsys, "build", str(manifest), "--no-load", "--no-sign")
    assert "requires signed images" in err and "drop --no-sign" in err


def test_policy_show_lists_the_rules(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = verify_cli(capsys, "policy", "show", "-o", "json")
    assert code == 0
    rules = json.loads(out)["rules"]
    assert rules[0]["repositories"] == ["*"] and rules[0]["keys"] == ["cosign"] and rules[0]["requireSBOM"]
