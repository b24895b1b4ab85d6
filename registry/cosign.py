"""cosign-compatible signatures: simple-signing payloads and DSSE / in-toto attestations.

Image signatures (cosign ``specs/SIGNATURE_SPEC.md``, sigstore ``pkg/signature/payload``): the payload is
compact JSON ``{"critical":{"identity":{"docker-reference":REPO},"image":{"docker-manifest-digest":DIGEST},
"type":"cosign container image signature"},"optional":null|{...}}`` and the signature is ECDSA P-256 /
SHA-256 in ASN.1 DER over the exact payload bytes, stored as standard base64.

Attestations (cosign ``specs/ATTESTATION_SPEC.md``, DSSE v1 ``protocol.md``): an in-toto Statement,
base64 in a DSSE envelope with payloadType ``application/vnd.in-toto+json``; the signature is over
``PAE(payloadType, payload) = "DSSEv1" SP len(type) SP type SP len(body) SP body``.

Verification order follows cosign: the signature over the exact bytes first, then the payload's
content; nothing in an unverified payload is interpreted.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from registry.errors import (
    AttestationError,
    PayloadError,
    SignatureMismatchError,
    SignedDigestMismatchError,
    UntrustedKeyError,
)
from registry.keys import fingerprint

SIMPLE_SIGNING_TYPE = "cosign container image signature"
SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_V1 = "https://in-toto.io/Statement/v1"
STATEMENT_V01 = "https://in-toto.io/Statement/v0.1"
STATEMENT_TYPES = (STATEMENT_V1, STATEMENT_V01)

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class SimpleSigning:
    """The verified content of a simple-signing payload."""

    docker_reference: str
    manifest_digest: str
    optional: dict[str, Any] | None


# --- encoding helpers --------------------------------------------------------------------------


def go_json(obj: Any) -> bytes:
    """JSON as Go's ``encoding/json.Marshal`` writes it: compact, UTF-8, and ``<``, ``>``, ``&``,
    U+2028, U+2029 escaped. Key order is the caller's (Go: struct order; maps: sorted)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode("utf-8")


def _b64decode(value: object, what: str, exc: type[Exception]) -> bytes:
    """Standard or URL-safe base64, padded or not (DSSE asks verifiers to accept both)."""
    if not isinstance(value, str) or not value:
        raise exc(f"{what} is missing or not a base64 string")
    s = value.strip()
    s += "=" * (-len(s) % 4)
    try:
        if "-" in s or "_" in s:
            return base64.b64decode(s, altchars=b"-_", validate=True)
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise exc(f"{what} is not valid base64 (corrupt or altered)") from None


def check_digest(digest: str, what: str = "manifest digest") -> str:
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise PayloadError(f"{what} {digest!r} is not 'sha256:' followed by 64 lower-case hex digits")
    return digest


def _verify_raw(data: bytes, signature: bytes, key: ec.EllipticCurvePublicKey, what: str) -> None:
    try:
        key.verify(signature, data, _ECDSA_SHA256)
    except InvalidSignature:
        raise SignatureMismatchError(
            f"{what} does not verify with public key {fingerprint(key)}: it was altered, or signed by "
            "another key; check that you pass the signer's cosign.pub"
        ) from None


# --- simple signing ----------------------------------------------------------------------------


def simple_signing_payload(
    docker_reference: str, manifest_digest: str, optional: Mapping[str, Any] | None = None
) -> bytes:
    """The payload bytes cosign writes for `manifest_digest` in repository `docker_reference`
    (registry + repository, no tag or digest); `optional` holds annotations (written with sorted keys,
    as Go marshals a map) or None for ``null``."""
    check_digest(manifest_digest)
    if not docker_reference or any(c.isspace() for c in docker_reference):
        raise PayloadError(f"docker reference {docker_reference!r} must be a non-empty repository name")
    payload = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": SIMPLE_SIGNING_TYPE,
        },
        "optional": None if optional is None else dict(sorted(optional.items())),
    }
    return go_json(payload)


def sign_bytes(data: bytes, key: ec.EllipticCurvePrivateKey) -> str:
    """ECDSA-SHA256 ASN.1 DER signature over `data`, standard base64 (``cosign sign-blob`` output)."""
    return base64.b64encode(key.sign(data, _ECDSA_SHA256)).decode("ascii")


def sign_image(
    manifest_digest: str,
    docker_reference: str,
    key: ec.EllipticCurvePrivateKey,
    optional: Mapping[str, Any] | None = None,
) -> tuple[bytes, str]:
    """Sign a manifest digest: returns (payload bytes, base64 signature), the layer blob and the
    ``dev.cosignproject.cosign/signature`` annotation of a cosign ``.sig`` manifest."""
    payload = simple_signing_payload(docker_reference, manifest_digest, optional)
    return payload, sign_bytes(payload, key)


def parse_simple_signing(payload: bytes) -> SimpleSigning:
    """Parse a simple-signing payload (call only after its signature verified)."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise PayloadError("signed payload is not JSON: not a cosign simple-signing payload") from None
    critical = doc.get("critical") if isinstance(doc, dict) else None
    if not isinstance(critical, dict):
        raise PayloadError("signed payload has no 'critical' object: not a cosign simple-signing payload")
    if critical.get("type") != SIMPLE_SIGNING_TYPE:
        raise PayloadError(
            f"signed payload field 'critical.type' is {critical.get('type')!r}, expected {SIMPLE_SIGNING_TYPE!r}"
        )
    identity, image = critical.get("identity"), critical.get("image")
    ref = identity.get("docker-reference") if isinstance(identity, dict) else None
    digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(ref, str):
        raise PayloadError("signed payload field 'critical.identity.docker-reference' is missing")
    if not isinstance(digest, str):
        raise PayloadError("signed payload field 'critical.image.docker-manifest-digest' is missing")
    check_digest(digest, "signed payload field 'critical.image.docker-manifest-digest'")
    optional = doc.get("optional")
    if optional is not None and not isinstance(optional, dict):
        raise PayloadError("signed payload field 'optional' must be an object or null")
    return SimpleSigning(docker_reference=ref, manifest_digest=digest, optional=optional)


def verify_image_signature(
    payload: bytes,
    signature_b64: str,
    public_key: ec.EllipticCurvePublicKey,
    expected_manifest_digest: str,
    media_type: str = SIMPLE_SIGNING_MEDIA_TYPE,
) -> SimpleSigning:
    """Verify one cosign image signature: the layer's media type, the signature over the exact payload
    bytes, the payload type, and that it names `expected_manifest_digest` (the sha256 of the manifest
    bytes actually fetched). Returns the payload content; raises a `SignatureError` child otherwise."""
    check_digest(expected_manifest_digest, "expected manifest digest")
    if media_type != SIMPLE_SIGNING_MEDIA_TYPE:
        raise PayloadError(
            f"signature layer has media type {media_type!r}, not {SIMPLE_SIGNING_MEDIA_TYPE!r}: "
            "it is not a cosign signature"
        )
    signature = _b64decode(signature_b64, f"signature annotation {SIGNATURE_ANNOTATION!r}", SignatureMismatchError)
    _verify_raw(payload, signature, public_key, "image signature")
    content = parse_simple_signing(payload)
    if content.manifest_digest != expected_manifest_digest:
        raise SignedDigestMismatchError(
            f"signature is valid but signs manifest {content.manifest_digest}, not {expected_manifest_digest}: "
            "the manifest was replaced or altered after signing"
        )
    return content


def verify_with_any(
    payload: bytes,
    signature_b64: str,
    trusted_keys: Iterable[ec.EllipticCurvePublicKey],
    expected_manifest_digest: str,
    media_type: str = SIMPLE_SIGNING_MEDIA_TYPE,
) -> tuple[SimpleSigning, ec.EllipticCurvePublicKey]:
    """Like `verify_image_signature` with a set of trusted keys: the first key the signature verifies
    with wins; payload and digest errors are reported as they are, not as an untrusted key."""
    keys = list(trusted_keys)
    for key in keys:
        try:
            return verify_image_signature(payload, signature_b64, key, expected_manifest_digest, media_type), key
        except SignatureMismatchError:
            continue
    names = ", ".join(fingerprint(k) for k in keys) or "none configured"
    raise UntrustedKeyError(
        f"image signature was made by none of the {len(keys)} trusted key(s) ({names}); "
        "add the signer's public key to the trust policy if you trust it"
    )


# --- DSSE / in-toto attestations ---------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_attestation(statement: Mapping[str, Any], key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """A DSSE envelope (as cosign ``attest`` writes it) carrying `statement`, signed with `key`."""
    kind = statement.get("_type")
    if kind not in STATEMENT_TYPES:
        raise AttestationError(f"statement field '_type' is {kind!r}, expected {STATEMENT_V1!r}")
    body = go_json(dict(statement))
    sig = key.sign(pae(IN_TOTO_PAYLOAD_TYPE, body), _ECDSA_SHA256)
    return {
        "payloadType": IN_TOTO_PAYLOAD_TYPE,
        "payload": base64.b64encode(body).decode("ascii"),
        "signatures": [{"keyid": "", "sig": base64.b64encode(sig).decode("ascii")}],
    }


def _subject_digests(statement: Mapping[str, Any]) -> list[str]:
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise AttestationError("statement field 'subject' is missing or empty")
    digests = []
    for i, s in enumerate(subjects):
        d = s.get("digest") if isinstance(s, dict) else None
        if not isinstance(d, dict):
            raise AttestationError(f"statement field 'subject[{i}].digest' is missing")
        if isinstance(d.get("sha256"), str):
            digests.append("sha256:" + d["sha256"])
    return digests


def verify_attestation(
    envelope: Mapping[str, Any] | bytes | str,
    public_key: ec.EllipticCurvePublicKey,
    subject_digest: str | None = None,
    predicate_type: str | None = None,
) -> dict[str, Any]:
    """Verify a DSSE envelope with `public_key` and return its in-toto statement.

    Checks: envelope fields, payloadType, that a signature verifies over PAE(payloadType, payload),
    the statement's ``_type``; optionally that a subject has sha256 `subject_digest` and that the
    predicateType is `predicate_type`."""
    if isinstance(envelope, bytes | str):
        try:
            envelope = json.loads(envelope)
        except (ValueError, UnicodeDecodeError):
            raise AttestationError("attestation is not JSON: not a DSSE envelope") from None
    if not isinstance(envelope, Mapping):
        raise AttestationError("attestation is not a JSON object: not a DSSE envelope")
    payload_type = envelope.get("payloadType")
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise AttestationError(f"envelope field 'payloadType' is {payload_type!r}, expected {IN_TOTO_PAYLOAD_TYPE!r}")
    body = _b64decode(envelope.get("payload"), "envelope field 'payload'", AttestationError)
    sigs = envelope.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise AttestationError("envelope field 'signatures' is missing or empty: the attestation is unsigned")
    message = pae(payload_type, body)
    for i, entry in enumerate(sigs):
        raw = entry.get("sig") if isinstance(entry, dict) else None
        sig = _b64decode(raw, f"envelope field 'signatures[{i}].sig'", SignatureMismatchError)
        try:
            public_key.verify(sig, message, _ECDSA_SHA256)
            break
        except InvalidSignature:
            continue
    else:
        raise SignatureMismatchError(
            f"attestation signature does not verify with public key {fingerprint(public_key)}: the envelope "
            "was altered, or signed by another key; check that you pass the signer's cosign.pub"
        )
    try:
        statement = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AttestationError("signed attestation payload is not JSON: not an in-toto statement") from None
    if not isinstance(statement, dict):
        raise AttestationError("signed attestation payload is not a JSON object: not an in-toto statement")
    kind = statement.get("_type")
    if kind not in STATEMENT_TYPES:
        raise AttestationError(f"statement field '_type' is {kind!r}, expected {STATEMENT_V1!r} (or v0.1)")
    if predicate_type is not None and statement.get("predicateType") != predicate_type:
        raise AttestationError(
            f"statement field 'predicateType' is {statement.get('predicateType')!r}, expected {predicate_type!r}"
        )
    if subject_digest is not None:
        check_digest(subject_digest, "expected subject digest")
        found = _subject_digests(statement)
        if subject_digest not in found:
            raise SignedDigestMismatchError(
                f"attestation is valid but its subjects ({', '.join(found) or 'no sha256 digests'}) do not "
                f"include {subject_digest}: it is about another artifact"
            )
    return statement


verify = verify_image_signature
