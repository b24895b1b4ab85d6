"""cosign's attachments of an image: signatures (``.sig``), attestations (``.att``) and SBOMs (``.sbom``).

Each kind is one manifest tagged ``sha256-<hex of the image digest>.<kind>`` in the image's
repository; every signature or attestation is one more layer of it (cosign ``specs/SIGNATURE_SPEC.md``,
``specs/ATTESTATION_SPEC.md``). This module makes those layers and checks them against trusted keys;
where the manifests live (an OCI layout, a registry) is the caller's business.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from registry import cosign
from registry.errors import (
    AttestationError,
    MissingSignatureError,
    SignatureError,
    SignatureMismatchError,
    UntrustedKeyError,
)
from registry.keys import fingerprint
from registry.oci.artifact import Attachment, Blob

SIG, ATT, SBOM = "sig", "att", "sbom"
CYCLONEDX_PREDICATE = "https://cyclonedx.org/bom"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
CYCLONEDX_MEDIA_TYPE = "application/vnd.cyclonedx+json"
PREDICATE_ANNOTATION = "predicateType"


def attachment_tag(image_digest: str, kind: str) -> str:
    """``sha256-<hex>.sig`` (or ``.att``, ``.sbom``): where cosign looks for an image's attachments."""
    algorithm, _, hexdigest = cosign.check_digest(image_digest, "image digest").partition(":")
    if kind not in (SIG, ATT, SBOM):
        raise ValueError(f"unknown attachment kind {kind!r}")
    return f"{algorithm}-{hexdigest}.{kind}"


def signature_blob(payload: bytes, signature_b64: str) -> Blob:
    return Blob(cosign.SIMPLE_SIGNING_MEDIA_TYPE, payload, {cosign.SIGNATURE_ANNOTATION: signature_b64})


def sign(
    image_digest: str, docker_reference: str, key: ec.EllipticCurvePrivateKey, annotations: Mapping[str, Any] | None
) -> Blob:
    """A ``.sig`` layer: the simple-signing payload for `image_digest`, signed with `key`."""
    payload, signature = cosign.sign_image(image_digest, docker_reference, key, annotations)
    return signature_blob(payload, signature)


def attest(image_digest: str, name: str, predicate_type: str, predicate: Any, key: ec.EllipticCurvePrivateKey) -> Blob:
    """An ``.att`` layer: an in-toto statement about `image_digest` in a signed DSSE envelope, with the
    empty signature annotation and the predicateType annotation cosign adds."""
    statement = {
        "_type": cosign.STATEMENT_V1,
        "subject": [{"name": name, "digest": {"sha256": image_digest.split(":", 1)[1]}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }
    envelope = cosign.sign_attestation(statement, key)
    return Blob(
        cosign.DSSE_MEDIA_TYPE,
        cosign.go_json(envelope),
        {cosign.SIGNATURE_ANNOTATION: "", PREDICATE_ANNOTATION: predicate_type},
    )


def sbom_blob(document: bytes) -> Blob:
    """A ``.sbom`` layer (``cosign attach sbom``): the CycloneDX JSON itself, unsigned; verifiers use
    the signed attestation, tools that read ``.sbom`` tags find it here."""
    return Blob(CYCLONEDX_MEDIA_TYPE, document)


def add(existing: Attachment | None, layer: Blob) -> Attachment:
    """The attachment with `layer` added (a new attachment when there was none)."""
    return Attachment.of([layer]) if existing is None else existing.with_layer(layer)


def _fingerprints(keys: Sequence[ec.EllipticCurvePublicKey]) -> str:
    return ", ".join(fingerprint(k) for k in keys) or "none configured"


def verify_signatures(
    attachment: Attachment | None, keys: Sequence[ec.EllipticCurvePublicKey], image_digest: str, where: str
) -> tuple[cosign.SimpleSigning, ec.EllipticCurvePublicKey]:
    """The first ``.sig`` layer that verifies with one of `keys` and names `image_digest`.

    No layer at all is `MissingSignatureError`. When none verifies, the most telling error is raised:
    a payload or digest problem of a layer signed by a trusted key beats "untrusted key"."""
    layers = [] if attachment is None else list(attachment.layers)
    if not layers:
        raise MissingSignatureError(f"{where} has no signature (no {attachment_tag(image_digest, SIG)}); sign it")
    if not keys:
        raise UntrustedKeyError(f"{where}: no trusted public key to check its signature with (see the trust policy)")
    specific: SignatureError | None = None
    for layer in layers:
        signature = layer.annotations.get(cosign.SIGNATURE_ANNOTATION, "")
        try:
            return cosign.verify_with_any(layer.data, signature, keys, image_digest, layer.media_type)
        except UntrustedKeyError:
            continue
        except SignatureError as e:  # signed by a trusted key, but wrong digest or malformed
            specific = specific or e
    if specific is not None:
        raise type(specific)(f"{where}: {specific}")
    raise UntrustedKeyError(
        f"{where}: none of its {len(layers)} signature(s) verifies with the trusted key(s) ({_fingerprints(keys)}): "
        "signed by another key, or the signature was altered"
    )


def _verify_envelope(
    layer: Blob, keys: Sequence[ec.EllipticCurvePublicKey], image_digest: str, where: str
) -> dict[str, Any]:
    if layer.media_type != cosign.DSSE_MEDIA_TYPE:
        raise AttestationError(f"{where}: attestation layer has media type {layer.media_type!r}, not a DSSE envelope")
    for key in keys:
        try:
            return cosign.verify_attestation(layer.data, key, subject_digest=image_digest)
        except SignatureMismatchError:
            continue
        except SignatureError as e:
            raise type(e)(f"{where}: {e}") from None
    raise UntrustedKeyError(
        f"{where}: an attestation ({layer.annotations.get(PREDICATE_ANNOTATION, 'unknown type')}) verifies with none "
        f"of the trusted key(s) ({_fingerprints(keys)}): it was altered, or signed by another key"
    )


def verify_attestations(
    attachment: Attachment | None, keys: Sequence[ec.EllipticCurvePublicKey], image_digest: str, where: str
) -> dict[str, dict[str, Any]]:
    """Every ``.att`` layer, verified: statements by predicateType. One bad layer fails the lot, so a
    tampered attestation is never silently skipped."""
    statements: dict[str, dict[str, Any]] = {}
    for layer in [] if attachment is None else attachment.layers:
        statement = _verify_envelope(layer, keys, image_digest, where)
        statements[str(statement.get("predicateType"))] = statement
    return statements


def require(statements: Mapping[str, Any], predicate_type: str, what: str, where: str) -> dict[str, Any]:
    """The verified statement of `predicate_type`, or MissingSignatureError."""
    if predicate_type not in statements:
        raise MissingSignatureError(f"{where} has no signed {what} attestation ({predicate_type}); attest it")
    return dict(statements[predicate_type])


def predicate_json(statement: Mapping[str, Any]) -> bytes:
    """The predicate as JSON bytes (for an SBOM: the document itself)."""
    return json.dumps(statement.get("predicate"), sort_keys=True).encode()
