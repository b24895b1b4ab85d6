"""Keys, image signatures and attestations in cosign's formats, checked against artifacts real cosign made."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.secret
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from registry import cosign, keys
from registry.errors import (
    AttestationError,
    KeyFormatError,
    KeyPasswordError,
    PayloadError,
    SignatureError,
    SignatureMismatchError,
    SignedDigestMismatchError,
    UnsupportedKeyTypeError,
    UntrustedKeyError,
)

FIXTURES = Path(__file__).parent / "fixtures" / "cosign"
CI = FIXTURES / "containers-image"
SC = FIXTURES / "sigstore-cosign"
VALID_DIGEST = "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"
COSIGN_PAYLOAD = (
    b'{"critical":{"identity":{"docker-reference":"192.168.64.2:5000/cosign-signed-single-sample"},'
    b'"image":{"docker-manifest-digest":"sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"},'
    b'"type":"cosign container image signature"},"optional":null}'
)
BLOB_DIGEST = "sha256:658781cd4ed9bca60dacd09f7bb914bb51502e8b5d619f57f39a1d652596cc24"
SLSA_V02 = "https://slsa.dev/provenance/v0.2"


@dataclass
class Layer:
    mime_type: str
    payload: bytes
    signature: str


def read_layer(path: Path) -> Layer:
    """containers/image's on-disk form of one cosign `.sig` layer."""
    raw = path.read_bytes()
    prefix = b"\x00sigstore-json\n"
    assert raw.startswith(prefix)
    doc = json.loads(raw[len(prefix) :])
    return Layer(doc["mimeType"], base64.b64decode(doc["payload"]), doc["annotations"][cosign.SIGNATURE_ANNOTATION])


def manifest_digest(case: str) -> str:
    return "sha256:" + hashlib.sha256((CI / case / "manifest.json").read_bytes()).hexdigest()


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.fixture(scope="module")
def cosign_pub() -> ec.EllipticCurvePublicKey:
    return keys.load_public_key((CI / "cosign.pub").read_bytes(), "cosign.pub")


@pytest.fixture(scope="module")
def cosign2_pub() -> ec.EllipticCurvePublicKey:
    return keys.load_public_key((CI / "cosign2.pub").read_bytes(), "cosign2.pub")


@pytest.fixture(scope="module")
def pair() -> tuple[keys.KeyPair, ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]:
    kp = keys.generate_key_pair(b"correct horse")
    return kp, keys.load_private_key(kp.private_pem, b"correct horse"), keys.load_public_key(kp.public_pem)


# --- (a) real cosign image signatures ----------------------------------------------------------


@pytest.mark.parametrize(
    "layer_path",
    ["dir-img-cosign-valid/signature-1", "dir-img-cosign-valid-2/signature-1", "dir-img-cosign-valid-2/signature-2"],
)
def test_real_cosign_signatures_verify(layer_path: str, cosign_pub: ec.EllipticCurvePublicKey) -> None:
    case = layer_path.split("/")[0]
    layer = read_layer(CI / layer_path)
    got = cosign.verify_image_signature(
        layer.payload, layer.signature, cosign_pub, manifest_digest(case), layer.mime_type
    )
    assert got.manifest_digest == VALID_DIGEST == manifest_digest(case)
    assert got.docker_reference == "192.168.64.2:5000/cosign-signed-single-sample"
    assert got.optional is None


def test_containers_image_signature_with_tag_and_optional(cosign_pub: ec.EllipticCurvePublicKey) -> None:
    layer = read_layer(CI / "dir-img-cosign-valid-with-tag/signature-1")
    got = cosign.verify_image_signature(layer.payload, layer.signature, cosign_pub, VALID_DIGEST, layer.mime_type)
    assert got.docker_reference == "192.168.64.2:5000/skopeo-signed:tag"
    assert got.optional is not None and got.optional["creator"].startswith("containers/image")
    # llmctl writes the same bytes for the same content (sorted optional keys, as Go marshals a map).
    assert cosign.simple_signing_payload(got.docker_reference, got.manifest_digest, got.optional) == layer.payload


@pytest.mark.parametrize("case", ["dir-img-cosign-modified-manifest", "dir-img-cosign-manifest-digest-error"])
def test_signature_for_another_manifest_is_refused(case: str, cosign_pub: ec.EllipticCurvePublicKey) -> None:
    layer = read_layer(CI / case / "signature-1")
    actual = manifest_digest(case)
    assert actual != VALID_DIGEST
    with pytest.raises(SignedDigestMismatchError, match=f"signs manifest {VALID_DIGEST}, not {actual}"):
        cosign.verify_image_signature(layer.payload, layer.signature, cosign_pub, actual, layer.mime_type)


def test_other_attachment_is_not_a_signature(cosign_pub: ec.EllipticCurvePublicKey) -> None:
    layer = read_layer(CI / "dir-img-cosign-other-attachment/signature-1")
    digest = manifest_digest("dir-img-cosign-other-attachment")
    with pytest.raises(PayloadError, match="media type 'text/plain'.*not a cosign signature"):
        cosign.verify_image_signature(layer.payload, layer.signature, cosign_pub, digest, layer.mime_type)
    # Even if the media type were forged, the annotation does not sign this payload.
    with pytest.raises(SignatureMismatchError):
        cosign.verify_image_signature(layer.payload, layer.signature, cosign_pub, digest)


def test_unknown_key_signature_is_refused(
    cosign_pub: ec.EllipticCurvePublicKey, cosign2_pub: ec.EllipticCurvePublicKey
) -> None:
    layer = read_layer(CI / "unknown-cosign-key.signature")
    assert layer.payload == COSIGN_PAYLOAD
    with pytest.raises(SignatureMismatchError, match=f"does not verify with public key {keys.fingerprint(cosign_pub)}"):
        cosign.verify_image_signature(layer.payload, layer.signature, cosign_pub, VALID_DIGEST)
    with pytest.raises(UntrustedKeyError, match="none of the 2 trusted key"):
        cosign.verify_with_any(layer.payload, layer.signature, [cosign_pub, cosign2_pub], VALID_DIGEST)


def test_wrong_key_cosign2_is_refused(
    cosign_pub: ec.EllipticCurvePublicKey, cosign2_pub: ec.EllipticCurvePublicKey
) -> None:
    layer = read_layer(CI / "dir-img-cosign-valid/signature-1")
    with pytest.raises(UntrustedKeyError, match=keys.fingerprint(cosign2_pub)):
        cosign.verify_with_any(layer.payload, layer.signature, [cosign2_pub], VALID_DIGEST)
    got, key = cosign.verify_with_any(layer.payload, layer.signature, [cosign2_pub, cosign_pub], VALID_DIGEST)
    assert keys.fingerprint(key) == keys.fingerprint(cosign_pub) and got.manifest_digest == VALID_DIGEST


def test_cosign_public_key_round_trips_byte_for_byte(cosign_pub: ec.EllipticCurvePublicKey) -> None:
    assert keys.public_key_pem(cosign_pub) == (CI / "cosign.pub").read_bytes()


# --- real cosign private keys ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosign-label-p256.key", "sigstore-label-p256.key"])
def test_real_cosign_private_keys_load(name: str) -> None:
    pem = (SC / name).read_bytes()
    key = keys.load_private_key(pem, b"hello", name)
    assert keys.describe_key(key) == "ECDSA P-256"
    with pytest.raises(KeyPasswordError, match=f"{name}: wrong password"):
        keys.load_private_key(pem, b"hell0", name)


def test_cosign_key_in_sec1_is_refused_like_cosign_does() -> None:
    pem = (SC / "cosign-label-n65536-sec1.key").read_bytes()
    with pytest.raises(KeyFormatError, match="not PKCS#8"):
        keys.load_private_key(pem, b"hello", "k")
    # N=65536 is one of go-securesystemslib's accepted strengths: decryption itself works.
    assert keys.decrypt_private_key_der(pem, b"hello")[:1] == b"\x30"


# --- (b) llmctl's own keys and signatures ------------------------------------------------------


def test_key_file_layout_matches_cosign(pair: tuple[keys.KeyPair, Any, Any]) -> None:
    kp, _, _ = pair
    text = kp.private_pem.decode()
    assert text.startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n") and text.endswith("-----\n")
    body_lines = text.splitlines()[1:-1]
    assert all(len(ln) == 64 for ln in body_lines[:-1]) and 0 < len(body_lines[-1]) <= 64
    body = json.loads(base64.b64decode("".join(body_lines)))
    cosign_body = json.loads(base64.b64decode("".join((SC / "sigstore-label-p256.key").read_text().splitlines()[1:-1])))
    # Same fields, order and parameters as the file real cosign wrote.
    assert json.dumps(body, sort_keys=False).startswith(
        '{"kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}'
    )
    assert list(body) == list(cosign_body) == ["kdf", "cipher", "ciphertext"]
    assert list(body["kdf"]) == list(cosign_body["kdf"]) and list(body["cipher"]) == list(cosign_body["cipher"])
    assert len(base64.b64decode(body["kdf"]["salt"])) == 32 and len(base64.b64decode(body["cipher"]["nonce"])) == 24
    # PKCS#8 P-256 (138 bytes) + 16-byte Poly1305 tag, as in cosign's key.
    assert len(base64.b64decode(body["ciphertext"])) == len(base64.b64decode(cosign_body["ciphertext"])) == 154
    assert kp.public_pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")


def test_cosign_label_and_wrong_password(tmp_path: Path) -> None:
    kp = keys.generate_key_pair(b"pw", label=keys.COSIGN_PRIVATE_KEY_LABEL)
    path = tmp_path / "cosign.key"
    path.write_bytes(kp.private_pem)
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----")
    key = keys.load_private_key(path.read_bytes(), b"pw", str(path))
    assert keys.public_key_pem(key) == kp.public_pem
    with pytest.raises(KeyPasswordError, match=f"{path}: wrong password"):
        keys.load_private_key(path.read_bytes(), b"", str(path))


def test_sign_and_verify_round_trip(pair: tuple[keys.KeyPair, Any, Any]) -> None:
    _, priv, pub = pair
    digest = "sha256:" + "ab" * 32
    payload, sig = cosign.sign_image(digest, "registry.internal:5000/llm/starcoder2", priv)
    assert payload == (
        b'{"critical":{"identity":{"docker-reference":"registry.internal:5000/llm/starcoder2"},'
        b'"image":{"docker-manifest-digest":"' + digest.encode() + b'"},'
        b'"type":"cosign container image signature"},"optional":null}'
    )
    assert base64.b64decode(sig)[0] == 0x30  # ASN.1 DER SEQUENCE, as cosign stores it
    got = cosign.verify_image_signature(payload, sig, pub, digest)
    assert got.docker_reference == "registry.internal:5000/llm/starcoder2" and got.optional is None
    with pytest.raises(SignedDigestMismatchError):
        cosign.verify_image_signature(payload, sig, pub, "sha256:" + "cd" * 32)


def test_payload_is_byte_identical_to_cosigns() -> None:
    ref = "192.168.64.2:5000/cosign-signed-single-sample"
    assert cosign.simple_signing_payload(ref, VALID_DIGEST) == COSIGN_PAYLOAD
    cosign_doc = json.loads(read_layer(CI / "dir-img-cosign-valid/signature-1").payload)
    ours = json.loads(cosign.simple_signing_payload(ref, VALID_DIGEST, {"model": "starcoder2"}))
    assert list(ours) == list(cosign_doc) and list(ours["critical"]) == list(cosign_doc["critical"])
    assert cosign.simple_signing_payload(ref, VALID_DIGEST, {"b": 1, "a": "<&>"}).endswith(
        b'"optional":{"a":"\\u003c\\u0026\\u003e","b":1}}'
    )


def test_bad_inputs_to_signing_are_refused(pair: tuple[keys.KeyPair, Any, Any]) -> None:
    _, priv, _ = pair
    with pytest.raises(PayloadError, match="64 lower-case hex"):
        cosign.sign_image("sha256:ABC", "r/x", priv)
    with pytest.raises(PayloadError, match="non-empty repository"):
        cosign.sign_image("sha256:" + "0" * 64, "", priv)


# --- (c) attestations --------------------------------------------------------------------------


def test_real_cosign_attestation_verifies() -> None:
    pub = keys.load_public_key((SC / "attest-blob.pub").read_bytes())
    env = (SC / "attest-blob-slsa-provenance.intoto.json").read_bytes()
    st = cosign.verify_attestation(env, pub, subject_digest=BLOB_DIGEST, predicate_type=SLSA_V02)
    assert st["_type"] == cosign.STATEMENT_V01 and st["subject"][0]["name"] == "blob"
    assert BLOB_DIGEST == "sha256:" + hashlib.sha256(b"some-payload").hexdigest()
    multi = (SC / "attest-blob-multiple-subjects.intoto.json").read_bytes()
    assert len(cosign.verify_attestation(multi, pub, subject_digest=BLOB_DIGEST)["subject"]) == 2


def test_real_cosign_attestation_refusals(cosign_pub: ec.EllipticCurvePublicKey) -> None:
    pub = keys.load_public_key((SC / "attest-blob.pub").read_bytes())
    env = (SC / "attest-blob-slsa-provenance.intoto.json").read_bytes()
    with pytest.raises(SignatureMismatchError, match="attestation signature does not verify"):
        cosign.verify_attestation(env, cosign_pub)
    with pytest.raises(SignedDigestMismatchError, match="about another artifact"):
        cosign.verify_attestation(env, pub, subject_digest="sha256:" + "0" * 64)
    with pytest.raises(AttestationError, match="'predicateType' is 'https://slsa.dev/provenance/v0.2'"):
        cosign.verify_attestation(env, pub, predicate_type="https://slsa.dev/provenance/v1")
    empty = (SC / "attest-blob-empty-subject.intoto.json").read_bytes()
    with pytest.raises(AttestationError, match="'subject' is missing or empty"):
        cosign.verify_attestation(empty, pub, subject_digest=BLOB_DIGEST)


def test_pae_matches_the_dsse_test_vector() -> None:
    assert cosign.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def _statement(digest: str) -> dict[str, Any]:
    return {
        "_type": cosign.STATEMENT_V1,
        "subject": [{"name": "registry.internal:5000/llm/starcoder2", "digest": {"sha256": digest.split(":")[1]}}],
        "predicateType": "https://cyclonedx.org/bom",
        "predicate": {"bomFormat": "CycloneDX", "specVersion": "1.6"},
    }


def test_attestation_round_trip_and_tampering(pair: tuple[keys.KeyPair, Any, Any], cosign_pub: Any) -> None:
    _, priv, pub = pair
    digest = "sha256:" + "ef" * 32
    env = cosign.sign_attestation(_statement(digest), priv)
    assert env["payloadType"] == "application/vnd.in-toto+json" and env["signatures"][0]["keyid"] == ""
    assert cosign.verify_attestation(json.dumps(env), pub, subject_digest=digest) == _statement(digest)

    body = base64.b64decode(env["payload"])
    i = body.index(b"CycloneDX")
    tampered = dict(env, payload=base64.b64encode(flip(body, i)).decode())
    with pytest.raises(SignatureMismatchError, match="attestation signature does not verify"):
        cosign.verify_attestation(tampered, pub)
    sig = base64.b64decode(env["signatures"][0]["sig"])
    bad_sig = dict(env, signatures=[{"keyid": "", "sig": base64.b64encode(flip(sig, len(sig) - 1)).decode()}])
    with pytest.raises(SignatureMismatchError):
        cosign.verify_attestation(bad_sig, pub)
    with pytest.raises(SignatureMismatchError):
        cosign.verify_attestation(env, cosign_pub)
    # The signature covers the payload type (PAE): relabelling is refused before and by the signature.
    with pytest.raises(AttestationError, match="'payloadType' is 'application/json'"):
        cosign.verify_attestation(dict(env, payloadType="application/json"), pub)
    with pytest.raises(AttestationError, match="unsigned"):
        cosign.verify_attestation(dict(env, signatures=[]), pub)
    with pytest.raises(AttestationError, match="not JSON"):
        cosign.verify_attestation(b"{not json", pub)
    # URL-safe base64 (allowed by DSSE) verifies too.
    urlsafe = dict(env, payload=base64.urlsafe_b64encode(body).decode().rstrip("="))
    assert cosign.verify_attestation(urlsafe, pub)["_type"] == cosign.STATEMENT_V1


def test_statement_type_is_checked(pair: tuple[keys.KeyPair, Any, Any]) -> None:
    _, priv, pub = pair
    with pytest.raises(AttestationError, match="'_type'"):
        cosign.sign_attestation({"_type": "https://example.com/other"}, priv)
    # A correctly signed envelope whose statement has the wrong _type.
    body = cosign.go_json({"_type": "https://in-toto.io/Statement/v2", "subject": []})
    sig = priv.sign(cosign.pae(cosign.IN_TOTO_PAYLOAD_TYPE, body), ec.ECDSA(hashes.SHA256()))
    env = {
        "payloadType": cosign.IN_TOTO_PAYLOAD_TYPE,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": "", "sig": base64.b64encode(sig).decode()}],
    }
    with pytest.raises(AttestationError, match="'_type' is 'https://in-toto.io/Statement/v2'"):
        cosign.verify_attestation(env, pub)


# --- (d) tamper matrix -------------------------------------------------------------------------


def test_flipped_payload_byte_is_refused(cosign_pub: ec.EllipticCurvePublicKey) -> None:
    layer = read_layer(CI / "dir-img-cosign-valid/signature-1")
    for i in (0, layer.payload.index(b"634a8f"), len(layer.payload) - 1):
        with pytest.raises(SignatureMismatchError, match="image signature does not verify"):
            cosign.verify_image_signature(flip(layer.payload, i), layer.signature, cosign_pub, VALID_DIGEST)


def test_flipped_signature_byte_is_refused(cosign_pub: ec.EllipticCurvePublicKey) -> None:
    layer = read_layer(CI / "dir-img-cosign-valid/signature-1")
    raw = base64.b64decode(layer.signature)
    for i in (1, 10, len(raw) - 1):  # DER length, inside r, last byte of s
        sig = base64.b64encode(flip(raw, i)).decode()
        with pytest.raises(SignatureMismatchError, match="does not verify"):
            cosign.verify_image_signature(layer.payload, sig, cosign_pub, VALID_DIGEST)
    with pytest.raises(SignatureMismatchError, match="not valid base64"):
        cosign.verify_image_signature(layer.payload, "!!" + layer.signature, cosign_pub, VALID_DIGEST)


def test_flipped_public_key_byte_is_refused() -> None:
    pem = (CI / "cosign.pub").read_bytes()
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    layer = read_layer(CI / "dir-img-cosign-valid/signature-1")
    outcomes = set()
    for i in range(len(der)):
        bad = b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(flip(der, i)) + b"\n-----END PUBLIC KEY-----\n"
        try:
            key = keys.load_public_key(bad, "cosign.pub")
        except KeyFormatError as exc:  # includes UnsupportedKeyTypeError for a flipped curve OID
            outcomes.add(type(exc).__name__)
            assert str(exc).startswith("cosign.pub: ")
            continue
        with pytest.raises(SignatureError):
            cosign.verify_image_signature(layer.payload, layer.signature, key, VALID_DIGEST)
        outcomes.add("verify-refused")
    assert "KeyFormatError" in outcomes  # every single-byte change is refused, one way or another
    garbled = pem.replace(b"MFkw", b"MF*w")
    with pytest.raises(KeyFormatError, match="corrupt base64"):
        keys.load_public_key(garbled, "cosign.pub")


def test_flipped_private_key_byte_is_refused(pair: tuple[keys.KeyPair, Any, Any]) -> None:
    kp, _, _ = pair
    body = json.loads(base64.b64decode(b"".join(kp.private_pem.splitlines()[1:-1])))
    ct = base64.b64decode(body["ciphertext"])
    body["ciphertext"] = base64.b64encode(flip(ct, 40)).decode()
    pem = keys._pem_encode(keys.SIGSTORE_PRIVATE_KEY_LABEL, json.dumps(body, separators=(",", ":")).encode())
    with pytest.raises(KeyPasswordError, match="altered"):
        keys.load_private_key(pem, b"correct horse", "cosign.key")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"N": 1 << 30, "r": 8, "p": 1}, "kdf.params"),
        ({"N": 16384, "r": 8, "p": 1}, "kdf.params"),
    ],
)
def test_unexpected_scrypt_parameters_are_refused(
    pair: tuple[keys.KeyPair, Any, Any], params: dict[str, int], field: str
) -> None:
    kp, _, _ = pair
    body = json.loads(base64.b64decode(b"".join(kp.private_pem.splitlines()[1:-1])))
    body["kdf"]["params"] = params
    pem = keys._pem_encode(keys.SIGSTORE_PRIVATE_KEY_LABEL, json.dumps(body).encode())
    with pytest.raises(KeyFormatError, match=f"unsupported scrypt parameters .* '{field}'"):
        keys.load_private_key(pem, b"correct horse", "cosign.key")


def test_corrupt_and_mislabelled_key_files_are_refused(pair: tuple[keys.KeyPair, Any, Any]) -> None:
    kp, _, _ = pair
    with pytest.raises(KeyFormatError, match="k: no PEM block"):
        keys.load_private_key(b"hello", b"x", "k")
    with pytest.raises(KeyFormatError, match="PEM label is 'PUBLIC KEY'"):
        keys.load_private_key(kp.public_pem, b"x", "k")
    with pytest.raises(KeyFormatError, match="PEM label is 'ENCRYPTED SIGSTORE PRIVATE KEY'"):
        keys.load_public_key(kp.private_pem, "k")
    not_json = keys._pem_encode(keys.COSIGN_PRIVATE_KEY_LABEL, b"\x00\x01garbage")
    with pytest.raises(KeyFormatError, match="not the JSON cosign writes"):
        keys.load_private_key(not_json, b"x", "k")
    wrong_cipher = keys._pem_encode(keys.COSIGN_PRIVATE_KEY_LABEL, b'{"kdf":{"name":"scrypt"},"cipher":{"name":"aes"}}')
    with pytest.raises(KeyFormatError, match="'cipher.name' must be 'nacl/secretbox'"):
        keys.load_private_key(wrong_cipher, b"x", "k")


def _encrypted(key: Any, password: bytes) -> bytes:
    """An encrypted key file in cosign's format holding any key type (cosign can write RSA / Ed25519)."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    p256 = ec.generate_private_key(ec.SECP256R1())
    pem = keys.encrypt_private_key(p256, password)
    body = json.loads(base64.b64decode(b"".join(pem.splitlines()[1:-1])))
    salt, nonce = base64.b64decode(body["kdf"]["salt"]), base64.b64decode(body["cipher"]["nonce"])
    box = nacl.secret.SecretBox(keys._scrypt(password, salt, 32768, 8, 1))
    body["ciphertext"] = base64.b64encode(box.encrypt(der, nonce).ciphertext).decode()
    return keys._pem_encode(keys.SIGSTORE_PRIVATE_KEY_LABEL, json.dumps(body, separators=(",", ":")).encode())


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "RSA 2048"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ECDSA P-384"),
    ],
)
def test_unsupported_key_types_are_refused(make: Any, name: str) -> None:
    key = make()
    with pytest.raises(UnsupportedKeyTypeError, match=f"key type {name} is not supported"):
        keys.load_private_key(_encrypted(key, b"pw"), b"pw", "other.key")
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(UnsupportedKeyTypeError, match=f"other.pub: key type {name}"):
        keys.load_public_key(pub_pem, "other.pub")


def test_unsupported_key_types_from_cosign_fixtures() -> None:
    with pytest.raises(UnsupportedKeyTypeError, match="RSA 2048"):
        keys.load_public_key((SC / "rsa-public.pub").read_bytes(), "rsa.pub")
    with pytest.raises(UnsupportedKeyTypeError, match="Ed25519"):
        keys.import_key_pair((SC / "ed25519-pkcs8.key").read_bytes(), b"pw", "ed.key")
    with pytest.raises(UnsupportedKeyTypeError, match="ECDSA P-384"):
        keys.import_key_pair((SC / "ec-p384.key").read_bytes(), b"pw", "p384.key")


def test_import_p256_key() -> None:
    kp = keys.import_key_pair((SC / "ec-p256-pkcs8.key").read_bytes(), b"pw", "p256.key")
    priv = keys.load_private_key(kp.private_pem, b"pw")
    payload, sig = cosign.sign_image(VALID_DIGEST, "r.example/x", priv)
    assert cosign.verify_image_signature(payload, sig, keys.load_public_key(kp.public_pem), VALID_DIGEST)
