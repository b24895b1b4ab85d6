"""`llmctl verify IMAGE` and `llmctl policy check IMAGE`: is this image what its signer says it is?

In order, stopping at the first failure (nothing later is read from an unverified source):
1. the image's manifest, config and every layer hash to the digests that name them (the store);
2. a `.sig` signature by a trusted key names exactly this manifest digest;
3. every `.att` attestation verifies with a trusted key and is about this digest; the CycloneDX SBOM
   (and, if the policy says so, SLSA provenance) is present;
4. the SBOM's weight digests equal the bytes the image carries at those paths, the digest the
   container re-checks at start (`--sha256`), and the image label;
5. the licence is one the policy allows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from manager import images
from manager.errors import LlmctlError
from manager.model_image import WEIGHTS_DIGEST_LABEL, WEIGHTS_MOUNTED_LABEL
from manager.policy import Rule, TrustPolicy, check_license, load_policy, resolve_keys
from registry import attachments
from registry.attachments import ATT, CYCLONEDX_PREDICATE, SIG, SLSA_PROVENANCE_V1
from registry.errors import RegistryError
from registry.keys import fingerprint, load_public_key
from registry.oci.contents import sha256_of_file
from registry.oci.image import Image
from registry.oci.layout import read_layout
from registry.sbom import ModelClaims, SbomError, model_claims


class ContentMismatchError(LlmctlError):
    """Signed claims (SBOM, labels) disagree with the bytes the image carries."""


@dataclass
class Verification:
    image: str
    digest: str
    signer: str | None = None
    attestations: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)  # path in the image -> sha256:<hex>
    license: str = ""
    policy: str = ""
    checks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_key_files(files: Sequence[Path]) -> list[ec.EllipticCurvePublicKey]:
    keys = []
    for path in files:
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise LlmctlError(f"{path}: cannot read the public key: {e.strerror or e}") from None
        keys.append(load_public_key(pem, str(path)))
    return keys


def _run_config(image: Image) -> dict[str, Any]:
    return dict(image.config_json().get("config") or {})


def _pinned_at_start(image: Image) -> str | None:
    """The digest the container's runtime re-checks at start: `--sha256 X` in its command."""
    args = [*(_run_config(image).get("Entrypoint") or []), *(_run_config(image).get("Cmd") or [])]
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--sha256":
            return str(value)
    return None


def check_contents(image: Image, claims: ModelClaims, where: str) -> dict[str, str]:
    """Each weight file the SBOM pins against the image: its bytes (or, for mounted weights, the
    digest the runtime enforces at start) and the label."""
    labels = _run_config(image).get("Labels") or {}
    mounted = labels.get(WEIGHTS_MOUNTED_LABEL) == "true"
    pinned = _pinned_at_start(image)
    found: dict[str, str] = {}
    for w in claims.weights:
        claimed = f"sha256:{w.sha256}"
        if not mounted:
            actual = sha256_of_file(image, w.path)
            if actual is None:
                raise ContentMismatchError(f"{where}: the SBOM pins {w.path} but the image has no such file")
            if actual != claimed:
                raise ContentMismatchError(
                    f"{where}: {w.path} in the image has {actual}, but the signed SBOM pins {claimed}: "
                    "the weights were swapped; refusing the image"
                )
        found[w.path] = claimed
    if len(claims.weights) == 1:
        claimed = f"sha256:{claims.weights[0].sha256}"
        for what, value in (
            ("the label " + WEIGHTS_DIGEST_LABEL, labels.get(WEIGHTS_DIGEST_LABEL)),
            ("--sha256", pinned),
        ):
            if value != claimed:
                raise ContentMismatchError(
                    f"{where}: {what} says {value}, but the signed SBOM pins {claimed}; refusing the image"
                )
    return found


def _provenance_pins(statement: dict[str, Any], weights: dict[str, str], where: str) -> None:
    deps = ((statement.get("predicate") or {}).get("buildDefinition") or {}).get("resolvedDependencies") or []
    resolved = {f"sha256:{d.get('digest', {}).get('sha256')}" for d in deps if isinstance(d, dict)}
    missing = [d for d in weights.values() if d not in resolved]
    if missing:
        raise ContentMismatchError(
            f"{where}: the signed provenance does not list weights {missing[0]} it was built from"
        )


def verify_image(
    image: str,
    *,
    key_files: Sequence[Path] = (),
    policy: TrustPolicy | None = None,
    enforce_policy: bool = False,
    layout: Path | None = None,
) -> Verification:
    """`check_image`, with the outcome (pass or the reason it failed) appended to the audit log."""
    from manager import audit

    event = "policy" if enforce_policy else "verify"
    try:
        result = check_image(image, key_files=key_files, policy=policy, enforce_policy=enforce_policy, layout=layout)
    except (LlmctlError, RegistryError) as e:
        audit.record(event, image, "denied", reason=" ".join(str(e).split()))
        raise
    audit.record(event, result.image, "ok", digest=result.digest, signer=result.signer, policy=result.policy)
    return result


def check_image(
    image: str,
    *,
    key_files: Sequence[Path] = (),
    policy: TrustPolicy | None = None,
    enforce_policy: bool = False,
    layout: Path | None = None,
) -> Verification:
    """Verify `image` from the local store. With `key_files` (like `cosign verify --key`) a signature
    and an SBOM attestation by one of those keys are required; otherwise the trust policy's rule for
    the image's repository decides which keys and what is required. `enforce_policy` also applies the
    rule's licence list (as `llmctl policy check` does)."""
    ref = images.resolve(image, layout)
    where = f"{ref.name} ({ref.digest})"
    result = Verification(image=ref.name, digest=ref.digest)
    stored = read_layout(layout or images.layout_dir(), ref.name)
    result.checks.append("manifest, config and layers match their digests")

    rule: Rule
    if key_files:
        keys = load_key_files(key_files)
        rule = Rule((ref.repository,), (), True, True, False, None, 0)
        result.policy = "--key " + ", ".join(str(p) for p in key_files)
    else:
        policy = policy or load_policy()
        rule = policy.rule_for(ref.repository)
        keys = resolve_keys(policy, rule) if rule.requires_keys else []
        result.policy = f"{policy.source}:{rule.line}" if rule.line else policy.source

    sig = images.read(ref, SIG, layout)
    if rule.require_signature or sig is not None and keys:
        _, key = attachments.verify_signatures(sig, keys, ref.digest, where)
        result.signer = fingerprint(key)
        result.checks.append(f"signed by {result.signer}")

    statements = attachments.verify_attestations(images.read(ref, ATT, layout), keys, ref.digest, where) if keys else {}
    result.attestations = sorted(statements)
    if rule.require_provenance:
        attachments.require(statements, SLSA_PROVENANCE_V1, "SLSA provenance", where)
    if rule.require_sbom:
        attachments.require(statements, CYCLONEDX_PREDICATE, "CycloneDX SBOM", where)
    if result.attestations:
        result.checks.append("attestations verified: " + ", ".join(result.attestations))

    if CYCLONEDX_PREDICATE in statements:
        try:
            claims = model_claims(statements[CYCLONEDX_PREDICATE].get("predicate") or {}, f"{where}: signed SBOM")
        except SbomError as e:
            raise ContentMismatchError(str(e)) from None
        result.weights = check_contents(stored, claims, where)
        result.license = ", ".join(claims.licenses)
        result.checks.append("weights in the image match the signed SBOM")
        if SLSA_PROVENANCE_V1 in statements:
            _provenance_pins(statements[SLSA_PROVENANCE_V1], result.weights, where)
            result.checks.append("provenance names the same weights")
    if enforce_policy and policy is not None and not key_files:
        labels = _run_config(stored).get("Labels") or {}
        license = result.license or str(labels.get("org.opencontainers.image.licenses", ""))
        check_license(policy, rule, license)
        result.license = license
        if rule.allowed_licenses is not None:
            result.checks.append(f"licence {license} allowed")
    return result


def report(v: Verification) -> str:
    lines = [f"verified {v.image}", f"  digest: {v.digest}", f"  policy: {v.policy}"]
    lines += [f"  ok: {c}" for c in v.checks]
    return "\n".join(lines)


def as_json(v: Verification) -> str:
    return json.dumps(v.to_json(), indent=2)
