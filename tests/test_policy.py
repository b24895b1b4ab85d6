"""The trust policy: schema errors located in the file, first match wins, keys from the store or files."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from manager import keys as keystore
from manager.policy import (
    PolicyError,
    PolicyViolation,
    Rule,
    TrustPolicy,
    check_license,
    default_policy,
    load_policy,
    policy_path,
    resolve_keys,
)
from registry import keys as cosign_keys
from registry.errors import UnsupportedKeyTypeError

HEADER = "apiVersion: llmctl.dev/v1\nkind: TrustPolicy\nrules:\n"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMCTL_KEY_PASSWORD", "x")
    monkeypatch.delenv("COSIGN_PASSWORD", raising=False)
    return tmp_path / "home"


def write(tmp_path: Path, rules: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(HEADER + rules)
    return path


def policy_error(path: Path) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_full_policy_loads_with_defaults_and_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "  - repositories: ['registry.internal:5000/llm/*']\n"
        "    keys: [team, ./keys/team.pub]\n"
        "    requireProvenance: true\n"
        "    allowedLicenses: [bigcode-openrail-m, apache-2.0]\n"
        "  - repositories: ['llmctl/*']\n"
        "    keys: [cosign]\n"
        "    requireSBOM: false\n",
    )
    policy = load_policy(path)
    assert policy.source == str(path) and policy.base_dir == tmp_path
    assert policy.rules == (
        Rule(
            ("registry.internal:5000/llm/*",),
            ("team", "./keys/team.pub"),
            True,
            True,
            True,
            ("bigcode-openrail-m", "apache-2.0"),
            4,
        ),
        Rule(("llmctl/*",), ("cosign",), True, False, False, None, 8),
    )


@pytest.mark.parametrize(
    "rules,expected",
    [
        (
            "  - repositories: ['a/*']\n    keys: [k]\n    requireSignature: 'yes'\n",
            ":6: trust policy field rules[0].requireSignature: 'yes' is not of type 'boolean'",
        ),
        (
            "  - repositories: ['a/*']\n    keys: [k]\n    requireSignatures: true\n",
            ":6: trust policy field rules[0]: Additional properties are not allowed "
            "('requireSignatures' was unexpected)",
        ),
        (
            "  - repositories: ['a/*']\n    keys: k\n",
            ":5: trust policy field rules[0].keys: 'k' is not of type 'array'",
        ),
        ("  - keys: [k]\n", ":4: trust policy field rules[0]: 'repositories' is a required property"),
        (
            "  - repositories: ['a/*']\n    keys: [k]\n  - repositories: ['b/*']\n",
            ":6: trust policy field rules[1]: a rule with requireSignature",
        ),
        (
            "  - repositories: ['a/*']\n    keys: []\n",
            ":5: trust policy field rules[0].keys: a rule with requireSignature",
        ),
        (
            "  - repositories: ['a/*']\n    keys: []\n    requireSignature: false\n    requireSBOM: false\n"
            "    requireProvenance: true\n",
            ":5: trust policy field rules[0].keys: a rule with",
        ),
        (
            "  - repositories: ['a/*']\n    keys: [k]\n    allowedLicenses: []\n",
            ":6: trust policy field rules[0].allowedLicenses: [] should be non-empty",
        ),
        ("  []\n", ":3: trust policy field rules: [] should be non-empty"),
    ],
)
def test_schema_errors_name_file_line_and_field(tmp_path: Path, rules: str, expected: str) -> None:
    path = write(tmp_path, rules)
    message = policy_error(path)
    assert message.startswith(str(path) + ":") and expected in message, message
    assert message.endswith("; see docs/policy.md for the trust policy format")


def test_a_rule_that_requires_nothing_needs_no_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path, "  - repositories: ['localhost:5000/*']\n    requireSignature: false\n    requireSBOM: false\n"
    )
    rule = load_policy(path).rule_for("localhost:5000/dev/model")
    assert rule.keys == () and resolve_keys(load_policy(path), rule) == []


def test_wrong_kind_and_syntax_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("apiVersion: llmctl.dev/v1\nkind: Model\nrules: [{repositories: ['*'], keys: [k]}]\n")
    assert f"{path}:2: trust policy field kind: 'TrustPolicy' was expected" in policy_error(path)
    path.write_text(HEADER + "  - repositories: ['*'\n")
    assert f"{path}:5:1: not valid YAML/JSON" in policy_error(path)


def test_first_matching_rule_wins_and_star_crosses_slashes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "  - repositories: ['registry.internal:5000/llm/*']\n    keys: [team]\n"
        "  - repositories: ['registry.internal:5000/*', 'llmctl/*']\n    keys: [other]\n",
    )
    policy = load_policy(path)
    assert policy.rule_for("registry.internal:5000/llm/deep/er/sc2").keys == ("team",)
    assert policy.rule_for("registry.internal:5000/tools/x").keys == ("other",)
    assert policy.rule_for("llmctl/starcoder2-3b").keys == ("other",)
    assert policy.rule_for("registry.internal:5000/llm/x").line == 4


def test_a_repository_no_rule_matches_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "  - repositories: ['llmctl/*']\n    keys: [k]\n")
    with pytest.raises(PolicyViolation, match=r"policy\.yaml: no rule matches repository 'ghcr\.io/evil/model'"):
        load_policy(path).rule_for("ghcr.io/evil/model")
    with pytest.raises(PolicyViolation):
        load_policy(path).rule_for("LLMCTL/x")  # matching is case-sensitive, as repository names are


def test_explicit_policy_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read the trust policy: No such file"):
        load_policy(tmp_path / "nope.yaml")


def test_without_a_policy_file_the_default_trusts_the_key_store(home: Path) -> None:
    empty = load_policy()
    assert empty.source == f"built-in default policy (no {policy_path()})" and empty.base_dir is None
    with pytest.raises(PolicyError, match="no keys to verify with"):
        resolve_keys(empty, empty.rule_for("anything/at/all"))
    keystore.generate("team")
    keystore.generate("release")
    policy = load_policy()
    rule = policy.rule_for("registry.example:5000/any/thing")
    assert rule.keys == ("release", "team") and rule.require_signature and rule.require_sbom
    assert not rule.require_provenance and rule.allowed_licenses is None
    fingerprints = {cosign_keys.fingerprint(k) for k in resolve_keys(policy, rule)}
    assert fingerprints == {info.fingerprint for info in keystore.list_keys()}
    assert default_policy() == policy


def test_the_policy_file_in_the_config_dir_is_used(home: Path) -> None:
    policy_path().parent.mkdir(parents=True)
    policy_path().write_text(HEADER + "  - repositories: ['llmctl/*']\n    keys: [cosign]\n")
    policy = load_policy()
    assert policy.source == str(policy_path()) and policy.rules[0].keys == ("cosign",)


def test_key_paths_are_relative_to_the_policy_file(tmp_path: Path, home: Path) -> None:
    info = keystore.generate("team")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "team.pub").write_bytes(info.public_key.read_bytes())
    path = write(tmp_path, "  - repositories: ['*']\n    keys: [./keys/team.pub, team]\n")
    policy = load_policy(path)
    keys = resolve_keys(policy, policy.rules[0])
    assert [cosign_keys.fingerprint(k) for k in keys] == [info.fingerprint, info.fingerprint]


def test_an_rsa_key_in_the_policy_is_refused(tmp_path: Path) -> None:
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = rsa_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "rsa.pub").write_bytes(pem)
    path = write(tmp_path, "  - repositories: ['*']\n    keys: [./rsa.pub]\n")
    policy = load_policy(path)
    with pytest.raises(UnsupportedKeyTypeError, match=r"rsa\.pub: key type RSA 2048 is not supported"):
        resolve_keys(policy, policy.rules[0])


def test_missing_keys_are_policy_errors_naming_the_rule(tmp_path: Path) -> None:
    path = write(
        tmp_path, "  - repositories: ['llmctl/*']\n    keys: [k]\n  - repositories: ['*']\n    keys: [ghost]\n"
    )
    policy = load_policy(path)
    with pytest.raises(PolicyError, match=rf"^{path}:6: key 'ghost': no key named 'ghost'"):
        resolve_keys(policy, policy.rules[1])
    path = write(tmp_path, "  - repositories: ['*']\n    keys: [team.pub, ./absent.pub]\n")
    policy = load_policy(path)
    with pytest.raises(PolicyError, match=r"write \./team\.pub"):
        resolve_keys(policy, policy.rules[0])
    policy = TrustPolicy((Rule(("*",), ("./absent.pub",), True, True, False, None, 4),), str(path), tmp_path)
    with pytest.raises(PolicyError, match=rf"^{path}:4: key './absent.pub': cannot read {tmp_path}/absent.pub"):
        resolve_keys(policy, policy.rules[0])


def test_licenses_are_compared_case_insensitively(tmp_path: Path) -> None:
    path = write(
        tmp_path, "  - repositories: ['*']\n    keys: [k]\n    allowedLicenses: [bigcode-openrail-m, Apache-2.0]\n"
    )
    policy = load_policy(path)
    rule = policy.rules[0]
    check_license(policy, rule, "apache-2.0")
    check_license(policy, rule, "BigCode-OpenRAIL-M")
    with pytest.raises(PolicyViolation) as info:
        check_license(policy, rule, "llama2")
    assert str(info.value) == (
        f"{path}:4: license 'llama2' is not allowed for this repository (allowed: bigcode-openrail-m, Apache-2.0)"
    )
    check_license(default_policy(), default_policy().rules[0], "anything-at-all")
