"""Sign a built image and attach its SBOM and SLSA provenance, the way `cosign sign` and
`cosign attest` do with a key: one `.sig` layer, one `.att` layer per statement, and the plain SBOM
at `.sbom` for tools that read it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from manager import images, keys
from registry import attachments
from registry.attachments import ATT, CYCLONEDX_PREDICATE, SBOM, SIG, SLSA_PROVENANCE_V1
from registry.keys import load_private_key
from registry.sbom import tool_version

BUILD_TYPE = "https://llmctl.dev/build/model-image/v1"
BUILDER_ID = "https://llmctl.dev/builder/local"
DEFAULT_KEY = "cosign"


def signing_key_file(key: str | None) -> Path | None:
    """The private key file `--key` names: a path, a name in the key store, or (None) the store's
    default key if there is one."""
    if key is None:
        default = keys.keys_dir() / f"{DEFAULT_KEY}.key"
        return default if default.is_file() else None
    if "/" in key or key.endswith(".key"):
        return Path(key)
    keys.export(key, private=True)  # a clear error when the store has no such key
    return keys.keys_dir() / f"{key}.key"


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise keys.KeyStoreError(f"{path}: cannot read the signing key: {e.strerror or e}") from None
    return load_private_key(pem, keys.password(confirm=False), source=str(path))


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance(
    *,
    manifest: dict[str, Any],
    dependencies: list[dict[str, Any]],
    started: str,
    finished: str,
    source_date_epoch: int,
) -> dict[str, Any]:
    """A SLSA v1 provenance predicate for one `llmctl build`: what was asked for (the manifest), what it
    resolved to (weights, base, runtime, each with a digest) and who built it when."""
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {"manifest": manifest},
            "internalParameters": {"SOURCE_DATE_EPOCH": source_date_epoch},
            "resolvedDependencies": dependencies,
        },
        "runDetails": {
            "builder": {"id": BUILDER_ID, "version": {"llmctl": tool_version()}},
            "metadata": {"invocationId": str(uuid.uuid4()), "startedOn": started, "finishedOn": finished},
        },
    }


def sign_and_attest(
    ref: images.ImageRef,
    key: ec.EllipticCurvePrivateKey,
    *,
    sbom: dict[str, Any],
    sbom_bytes: bytes,
    provenance_predicate: dict[str, Any],
    layout: Path | None = None,
) -> None:
    """Write the signature, the two attestations and the SBOM attachment of `ref` (adding to any
    already there, as cosign does for a second signer)."""
    signature = attachments.sign(ref.digest, ref.repository, key, None)
    images.write(ref, SIG, attachments.add(images.read(ref, SIG, layout), signature), layout)
    att = images.read(ref, ATT, layout)
    for predicate_type, predicate in ((CYCLONEDX_PREDICATE, sbom), (SLSA_PROVENANCE_V1, provenance_predicate)):
        att = attachments.add(att, attachments.attest(ref.digest, ref.repository, predicate_type, predicate, key))
    assert att is not None
    images.write(ref, ATT, att, layout)
    images.write(ref, SBOM, attachments.add(images.read(ref, SBOM, layout), attachments.sbom_blob(sbom_bytes)), layout)
