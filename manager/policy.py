"""The trust policy (``<config>/policy.yaml``): which keys an image must be signed with, and what else it needs.

    apiVersion: llmctl.dev/v1
    kind: TrustPolicy
    rules:                  # the first rule whose pattern matches the image's repository wins
      - repositories: ["registry.internal:5000/llm/*"]
        keys: [team, ./keys/team.pub]   # key store names (`llmctl key ls`) or PEM files
        requireSignature: true          # default true
        requireSBOM: true               # default true: a signed CycloneDX attestation
        requireProvenance: false        # default false: a signed SLSA provenance attestation
        allowedLicenses: [bigcode-openrail-m, apache-2.0]   # absent: any license
      - repositories: ["llmctl/*"]
        keys: [cosign]

A repository no rule matches is rejected: the policy lists what is trusted, never what is not.
Without a policy file every repository must be signed, with an SBOM, by a key in the key store.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from manager import keys as keystore
from manager.errors import LlmctlError
from manager.paths import config_dir
from manager.yamlschema import parse_file
from registry import keys as cosign_keys

API_VERSION = "llmctl.dev/v1"
DOCS_HINT = "see docs/policy.md for the trust policy format"

_STRINGS: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 1}}

POLICY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "llmctl trust policy",
    "type": "object",
    "required": ["apiVersion", "kind", "rules"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "TrustPolicy"},
        "rules": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["repositories"],
                "additionalProperties": False,
                "properties": {
                    # fnmatch globs over "registry/path" (no tag, no digest); "*" also matches "/"
                    "repositories": {**_STRINGS, "minItems": 1},
                    # optional only so a rule that requires nothing (a local dev registry) needs no keys
                    "keys": _STRINGS,
                    "requireSignature": {"type": "boolean"},
                    "requireSBOM": {"type": "boolean"},
                    "requireProvenance": {"type": "boolean"},
                    # an empty list would refuse every image: almost surely a mistake, so not allowed
                    "allowedLicenses": {**_STRINGS, "minItems": 1},
                },
            },
        },
    },
}


class PolicyError(LlmctlError):
    """The trust policy file cannot be read, does not follow the schema, or names a key that is missing."""


class PolicyViolation(LlmctlError):
    """An image the trust policy rejects (no rule for its repository, a license not allowed)."""


@dataclass(frozen=True)
class Rule:
    repositories: tuple[str, ...]
    keys: tuple[str, ...]  # key store names, or paths to PEM public keys (those contain a "/")
    require_signature: bool
    require_sbom: bool
    require_provenance: bool
    allowed_licenses: tuple[str, ...] | None  # None: any license
    line: int  # where the rule starts in the policy file; 0 for the built-in default

    @property
    def requires_keys(self) -> bool:
        return self.require_signature or self.require_sbom or self.require_provenance

    def matches(self, repository: str) -> bool:
        # fnmatchcase: the same answer on every OS; fnmatch's "*" already crosses "/"
        return any(fnmatch.fnmatchcase(repository, pattern) for pattern in self.repositories)


@dataclass(frozen=True)
class TrustPolicy:
    rules: tuple[Rule, ...]
    source: str  # the policy file, or a description of the built-in default, for messages
    base_dir: Path | None  # relative key paths are relative to this (the policy file's directory)

    def rule_for(self, repository: str) -> Rule:
        """The first rule matching `repository` (``registry/path``, without tag or digest)."""
        for rule in self.rules:
            if rule.matches(repository):
                return rule
        raise PolicyViolation(
            f"{self.source}: no rule matches repository {repository!r}; images from it are rejected "
            "(add a rule to the policy)"
        )


def policy_path() -> Path:
    return config_dir() / "policy.yaml"


def _where(policy: TrustPolicy, rule: Rule) -> str:
    return f"{policy.source}:{rule.line}" if rule.line else policy.source


def default_policy() -> TrustPolicy:
    """Every repository signed, with a signed SBOM, by any key in the key store (read now, not later)."""
    names = tuple(info.name for info in keystore.list_keys())
    rule = Rule(("*",), names, True, True, False, None, 0)
    return TrustPolicy((rule,), f"built-in default policy (no {policy_path()})", None)


def load_policy(path: Path | None = None) -> TrustPolicy:
    """The policy in `path` (which must exist), else `policy_path()` if it exists, else `default_policy()`."""
    if path is None:
        path = policy_path()
        if not path.exists():
            return default_policy()
    doc = parse_file(path, POLICY_SCHEMA, what="trust policy", error=PolicyError, docs_hint=DOCS_HINT)
    rules = []
    for i, raw in enumerate(doc.data["rules"]):
        licenses = raw.get("allowedLicenses")
        rule = Rule(
            repositories=tuple(raw["repositories"]),
            keys=tuple(raw.get("keys", ())),
            require_signature=raw.get("requireSignature", True),
            require_sbom=raw.get("requireSBOM", True),
            require_provenance=raw.get("requireProvenance", False),
            allowed_licenses=tuple(licenses) if licenses is not None else None,
            line=doc.line(("rules", i)),
        )
        if rule.requires_keys and not rule.keys:
            # attestations are verified with the rule's keys too, so any requirement needs one
            at = ("rules", i, "keys") if "keys" in raw else ("rules", i)
            raise doc.error(
                at, "a rule with requireSignature, requireSBOM or requireProvenance true must list at least one key"
            )
        rules.append(rule)
    return TrustPolicy(tuple(rules), str(path), path.parent)


def resolve_keys(policy: TrustPolicy, rule: Rule) -> list[ec.EllipticCurvePublicKey]:
    """The rule's public keys. A bad or non-P-256 key file raises registry's KeyFormatError or
    UnsupportedKeyTypeError (they name the file); a missing key is a PolicyError."""
    where = _where(policy, rule)
    if rule.requires_keys and not rule.keys:  # only the default policy gets here: the key store is empty
        raise PolicyError(
            f"{where}: no keys to verify with; create one with `llmctl key generate` (or `llmctl key import`), "
            f"or write a policy at {policy_path()}"
        )
    out = []
    for entry in rule.keys:
        if "/" in entry:  # a path; key store names never contain "/"
            path = Path(entry).expanduser()
            if not path.is_absolute() and policy.base_dir is not None:
                path = policy.base_dir / path
            try:
                pem = path.read_bytes()
            except OSError as e:
                raise PolicyError(f"{where}: key {entry!r}: cannot read {path}: {e.strerror or e}") from None
            source = str(path)
        else:
            try:
                pem = keystore.export(entry)
            except keystore.KeyStoreError as e:
                hint = f" (for a file next to the policy write ./{entry})" if entry.endswith((".pub", ".pem")) else ""
                raise PolicyError(f"{where}: key {entry!r}: {e}{hint}") from None
            source = str(keystore.keys_dir() / f"{entry}.pub")
        out.append(cosign_keys.load_public_key(pem, source))
    return out


def check_license(policy: TrustPolicy, rule: Rule, license: str) -> None:
    """PolicyViolation unless the rule allows `license` (compared case-insensitively, as written: no SPDX logic)."""
    allowed = rule.allowed_licenses
    if allowed is None or license.casefold() in {a.casefold() for a in allowed}:
        return
    raise PolicyViolation(
        f"{_where(policy, rule)}: license {license!r} is not allowed for this repository "
        f"(allowed: {', '.join(allowed)})"
    )


def rule_json(rule: Rule) -> dict[str, Any]:
    """A rule as the policy file spells it."""
    out: dict[str, Any] = {
        "repositories": list(rule.repositories),
        "keys": list(rule.keys),
        "requireSignature": rule.require_signature,
        "requireSBOM": rule.require_sbom,
        "requireProvenance": rule.require_provenance,
    }
    if rule.allowed_licenses is not None:
        out["allowedLicenses"] = list(rule.allowed_licenses)
    return out


def describe_rule(rule: Rule) -> str:
    """One line per rule for `llmctl policy show`."""
    needs = [
        n
        for n, on in (
            ("signature", rule.require_signature),
            ("SBOM", rule.require_sbom),
            ("provenance", rule.require_provenance),
        )
        if on
    ]
    licences = ", ".join(rule.allowed_licenses) if rule.allowed_licenses is not None else "any"
    return (
        f"{', '.join(rule.repositories)}: requires {', '.join(needs) or 'nothing'}; "
        f"keys {', '.join(rule.keys) or 'none'}; licences {licences}"
    )
