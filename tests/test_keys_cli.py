"""`llmctl key`: keys written in cosign's formats, usable by the signing code, never leaked."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from manager import cli
from registry import cosign
from registry import keys as cosign_keys

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path))
    monkeypatch.setenv("LLMCTL_KEY_PASSWORD", "correct horse")
    monkeypatch.delenv("COSIGN_PASSWORD", raising=False)
    return tmp_path


def test_generate_writes_a_cosign_key_pair_that_signs_and_verifies(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["key", "generate", "--name", "release"]) == 0
    out = capsys.readouterr().out
    priv, pub = home / "config" / "keys" / "release.key", home / "config" / "keys" / "release.pub"
    assert str(priv) in out and "fingerprint:" in out
    assert "correct horse" not in out
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
    key = cosign_keys.load_private_key(priv.read_bytes(), b"correct horse")
    payload, signature = cosign.sign_image(DIGEST, "registry.local/models/demo", key)
    public = cosign_keys.load_public_key(pub.read_bytes())
    cosign.verify_image_signature(payload, signature, public, expected_manifest_digest=DIGEST)


def test_wrong_password_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["key", "generate"]) == 0
    pem = (home / "config" / "keys" / "cosign.key").read_bytes()
    with pytest.raises(cosign_keys.KeyPasswordError):
        cosign_keys.load_private_key(pem, b"wrong")


def test_existing_key_is_not_overwritten_without_force(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["key", "generate"]) == 0
    before = (home / "config" / "keys" / "cosign.key").read_bytes()
    assert cli.main(["key", "generate"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (home / "config" / "keys" / "cosign.key").read_bytes() == before
    assert cli.main(["key", "generate", "--force"]) == 0
    assert (home / "config" / "keys" / "cosign.key").read_bytes() != before


def test_import_export_and_ls(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "plain.pem"
    pem.write_bytes(
        raw.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    assert cli.main(["key", "import", str(pem), "--name", "ci"]) == 0
    capsys.readouterr()
    assert cli.main(["key", "export", "--name", "ci"]) == 0
    exported = capsys.readouterr().out.encode()
    assert cosign_keys.fingerprint(cosign_keys.load_public_key(exported)) == cosign_keys.fingerprint(raw.public_key())
    assert cli.main(["key", "ls", "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["name"] for k in listed] == ["ci"]


def test_bad_inputs_are_one_line_errors(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rsa_pem = tmp_path / "rsa.pem"
    rsa_pem.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cases = [
        (["key", "import", str(rsa_pem)], "RSA"),
        (["key", "import", str(tmp_path / "missing.pem")], "cannot read"),
        (["key", "export", "--name", "nobody"], "no key named 'nobody'"),
        (["key", "generate", "--name", "../escape"], "is not valid"),
    ]
    for argv, expected in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("llmctl: error: ") and expected in err and err.count("\n") == 1, err


def test_no_password_and_no_terminal_is_an_error(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LLMCTL_KEY_PASSWORD")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli.main(["key", "generate"]) == 1
    assert "set LLMCTL_KEY_PASSWORD" in capsys.readouterr().err
    assert not (home / "config" / "keys" / "cosign.key").exists()
