"""The audit log: a hash chain with signed checkpoints that catches edits, removals, reordering,
truncation and rewritten history, written safely by concurrent processes, holding no secrets."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from manager import audit as manager_audit
from manager import keys
from registry import keys as cosign_keys
from registry.audit import GENESIS, AuditError, AuditLog, canonical_json, entry_hash

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.log")


@pytest.fixture(scope="module")
def signer() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def stranger() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def fill(log: AuditLog, n: int) -> None:
    for i in range(1, n + 1):
        log.append("install", f"release-{i}", details={"version": i, "image": f"llmctl/demo:{i}"})


def read_lines(log: AuditLog) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.path.read_text().splitlines()]


def write_lines(log: AuditLog, lines: list[dict[str, Any]]) -> None:
    log.path.write_bytes(b"".join(canonical_json(d) + b"\n" for d in lines))


def rechain(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a careful attacker does after changing entries: renumber and recompute every hash."""
    prev = GENESIS
    for seq, d in enumerate(lines, 1):
        d.update(seq=seq, prev=prev)
        d["hash"] = entry_hash(d)
        prev = d["hash"]
    return lines


# --- writing and reading -----------------------------------------------------------------------


def test_append_and_read_back_a_linked_chain(log: AuditLog) -> None:
    written = [
        log.append("pull", "registry.local/models/demo@sha256:" + "ab" * 32, details={"bytes": 1234}),
        log.append("verify", "llmctl/demo:1", outcome="denied", details={"reason": "unsigned"}, actor="ci@runner"),
        log.append("install", "demo", outcome="failed", details={"chart": "demo", "paths": [Path("/x")]}),
    ]
    entries = log.entries()
    assert entries == written
    assert [e.seq for e in entries] == [1, 2, 3]
    assert entries[0].prev == GENESIS
    assert entries[1].prev == entries[0].hash and entries[2].prev == entries[1].hash
    for e in entries:
        assert e.hash == entry_hash(e.to_dict())
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e.time)
    assert entries[0].actor.count("@") == 1 and entries[1].actor == "ci@runner"
    assert entries[1].outcome == "denied" and entries[2].details == {"chart": "demo", "paths": ["/x"]}
    report = log.verify()
    assert report.ok and report.entries == 3 and report.head == entries[2].hash and report.problems == []


def test_an_absent_log_is_empty_and_valid(log: AuditLog) -> None:
    assert log.entries() == []
    report = log.verify()
    assert report.ok and report.entries == 0
    assert not log.path.exists()


def test_log_and_checkpoints_are_private_files(log: AuditLog, signer: ec.EllipticCurvePrivateKey) -> None:
    old = os.umask(0)
    try:
        fill(log, 1)
        log.checkpoint(signer)
    finally:
        os.umask(old)
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.checkpoint_path.stat().st_mode) == 0o600


def test_secrets_in_details_are_redacted(log: AuditLog) -> None:
    entry = log.append(
        "push",
        "https://bob:hunter2@registry.local/models/demo",
        details={
            "password": "hunter2",
            "registry": {"Authorization": "Bearer abc.def", "url": "https://u:pw1234@r.local/v2/"},
            "apiKey": "sk-123",
            "access_token": "tok-456",
            "headers": [{"X-Client-Secret": "s3cr3t"}],
            "max_tokens": 64,
        },
    )
    raw = log.path.read_text()
    for secret in ("hunter2", "Bearer", "pw1234", "sk-123", "tok-456", "s3cr3t"):
        assert secret not in raw
    d = entry.details
    assert d["password"] == d["apiKey"] == d["access_token"] == "[REDACTED]"
    assert d["registry"] == {"Authorization": "[REDACTED]", "url": "https://[REDACTED]@r.local/v2/"}
    assert d["headers"] == [{"X-Client-Secret": "[REDACTED]"}]
    assert d["max_tokens"] == 64
    assert entry.subject == "https://[REDACTED]@registry.local/models/demo"
    assert log.verify().ok


def test_bad_event_or_outcome_is_a_caller_bug(log: AuditLog) -> None:
    with pytest.raises(ValueError, match="event"):
        log.append("Install now", "x")
    with pytest.raises(ValueError, match="outcome"):
        log.append("install", "x", outcome="maybe")
    assert not log.path.exists()


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from registry.audit import AuditLog
    log = AuditLog(Path(sys.argv[2]))
    for i in range(50):
        log.append("pull", f"worker-{sys.argv[3]}", details={"i": i})
    """
)


def test_concurrent_appends_from_four_processes_make_one_valid_chain(log: AuditLog) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(log.path), str(w)], stderr=subprocess.PIPE)
        for w in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(1, 201))
    for w in range(4):
        mine = [e.details["i"] for e in entries if e.subject == f"worker-{w}"]
        assert mine == list(range(50))
    report = log.verify()
    assert report.ok, report.problems
    assert report.entries == 200


# --- tampering ---------------------------------------------------------------------------------


def test_a_changed_field_is_detected(log: AuditLog) -> None:
    fill(log, 4)
    lines = read_lines(log)
    lines[1]["outcome"] = "failed"
    write_lines(log, lines)
    report = log.verify()
    assert not report.ok and report.first_bad_line == 2
    assert re.search(r"audit\.log:2 \(seq 2\): its hash does not match its content", report.problems[0])


def test_a_removed_middle_entry_is_detected(log: AuditLog) -> None:
    fill(log, 4)
    lines = read_lines(log)
    del lines[1]
    write_lines(log, lines)
    report = log.verify()
    assert not report.ok and report.first_bad_line == 2
    assert "seq 3 follows seq 1: entries were removed" in report.problems[0]
    assert "prev is not the previous entry's hash" in report.problems[0]


def test_swapped_entries_are_detected(log: AuditLog) -> None:
    fill(log, 4)
    lines = read_lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(log, lines)
    report = log.verify()
    assert not report.ok and report.first_bad_line == 2
    assert any("reordered" in p for p in report.problems)


def test_an_edited_entry_with_a_recomputed_hash_is_caught_by_the_next_prev(log: AuditLog) -> None:
    fill(log, 4)
    lines = read_lines(log)
    lines[1]["subject"] = "someone-else"
    lines[1]["hash"] = entry_hash(lines[1])
    write_lines(log, lines)
    report = log.verify()
    assert not report.ok and report.first_bad_line == 3
    assert "audit.log:3 (seq 3): its prev is not the previous entry's hash" in report.problems[0]


def test_a_rewritten_history_is_caught_by_a_signed_checkpoint(
    log: AuditLog, signer: ec.EllipticCurvePrivateKey
) -> None:
    fill(log, 3)
    cp = log.checkpoint(signer)
    assert (cp.seq, cp.hash) == (3, log.entries()[-1].hash)
    fill(log, 2)
    lines = read_lines(log)
    lines[0]["outcome"] = "denied"
    write_lines(log, rechain(lines))
    assert log.verify(public_keys=None).problems != []  # even unsigned, the checkpoint no longer matches
    report = log.verify(public_keys=[signer.public_key()])
    assert not report.ok and report.checkpoints == 1 and report.checkpoints_verified == 0
    assert "entry seq 3 has hash" in report.problems[0] and "history up to seq 3 was rewritten" in report.problems[0]


def test_truncation_after_a_checkpoint_is_detected(log: AuditLog, signer: ec.EllipticCurvePrivateKey) -> None:
    fill(log, 5)
    log.checkpoint(signer)
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:3]))
    report = log.verify(public_keys=[signer.public_key()])
    assert not report.ok and report.entries == 3
    assert "holds entries up to seq 3 but the checkpoint" in report.problems[0]
    assert "covers seq 5: the log was truncated" in report.problems[0]


def test_a_corrupt_line_is_reported_with_its_line_number(log: AuditLog) -> None:
    fill(log, 3)
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"\x00garbage\n"
    log.path.write_bytes(b"".join(lines))
    report = log.verify()
    assert not report.ok and report.first_bad_line == 2
    assert re.search(r"audit\.log:2: not valid JSON", report.problems[0])
    with pytest.raises(AuditError, match=r"audit\.log:2: not valid JSON"):
        log.entries()


def test_an_incomplete_last_line_stops_appends(log: AuditLog) -> None:
    fill(log, 2)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-10])
    with pytest.raises(AuditError, match=r"audit\.log:2: the last line is incomplete"):
        log.append("install", "x")
    assert log.verify().first_bad_line == 2


# --- checkpoints -------------------------------------------------------------------------------


def test_checkpoints_verify_only_with_the_signers_key(
    log: AuditLog, signer: ec.EllipticCurvePrivateKey, stranger: ec.EllipticCurvePrivateKey
) -> None:
    fill(log, 2)
    log.checkpoint(signer)
    good = log.verify(public_keys=[stranger.public_key(), signer.public_key()])
    assert good.ok and good.checkpoints == good.checkpoints_verified == 1

    wrong = log.verify(public_keys=[stranger.public_key()])
    assert not wrong.ok and wrong.checkpoints_verified == 0
    assert "which is not one of the 1 trusted key(s)" in wrong.problems[0]
    assert not log.verify(public_keys=[]).ok


def test_a_forged_checkpoint_is_refused(
    log: AuditLog, signer: ec.EllipticCurvePrivateKey, stranger: ec.EllipticCurvePrivateKey
) -> None:
    fill(log, 2)
    log.checkpoint(stranger)
    forged = read_lines_of(log.checkpoint_path)[0]
    forged["key"] = cosign_keys.fingerprint(signer)  # claims the trusted signer, signed by the stranger
    log.checkpoint_path.write_bytes(canonical_json(forged) + b"\n")
    report = log.verify(public_keys=[signer.public_key()])
    assert not report.ok
    assert "does not verify with key" in report.problems[0] and "altered or forged" in report.problems[0]


def test_checkpoint_refuses_a_tampered_or_empty_log(log: AuditLog, signer: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(AuditError, match="nothing to checkpoint"):
        log.checkpoint(signer)
    fill(log, 2)
    lines = read_lines(log)
    lines[0]["subject"] = "other"
    write_lines(log, lines)
    with pytest.raises(AuditError, match="refusing to checkpoint a log that fails verification"):
        log.checkpoint(signer)
    assert not log.checkpoint_path.exists()


def read_lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- manager: the key store, the data directory, the errors the CLI reports ---------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMCTL_KEY_PASSWORD", "correct horse")
    monkeypatch.delenv("COSIGN_PASSWORD", raising=False)
    return tmp_path / "home"


def test_record_show_checkpoint_and_verify_with_the_key_store(home: Path) -> None:
    manager_audit.record("install", "sc2", chart="starcoder2-7b-q4", version=1)
    manager_audit.record("policy", "llmctl/demo:1", "denied", reason="unsigned", password="hunter2")
    assert manager_audit.log_path() == home / "data" / "audit.log"

    table = manager_audit.show(as_json=False).splitlines()
    assert table[0].split() == ["SEQ", "TIME", "EVENT", "OUTCOME", "SUBJECT", "ACTOR"]
    assert table[2].split()[:5] == ["2", table[2].split()[1], "policy", "denied", "llmctl/demo:1"]
    shown = json.loads(manager_audit.show(as_json=True))
    assert shown[1]["details"] == {"reason": "unsigned", "password": "[REDACTED]"}
    assert "hunter2" not in manager_audit.log_path().read_text()

    with pytest.raises(keys.KeyStoreError, match="llmctl key generate"):
        manager_audit.checkpoint(None)
    keys.generate()
    cp = manager_audit.checkpoint(None)
    assert cp.seq == 2 and cp.key == keys.list_keys()[0].fingerprint
    report = manager_audit.verify(None)
    assert report.ok and report.checkpoints_verified == 1

    other = keys.generate("other")
    assert not manager_audit.verify([other.public_key]).ok


def test_record_failure_is_an_llmctl_error(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "data").write_text("not a directory")
    with pytest.raises(manager_audit.AuditWriteError, match="the install of 'sc2' was not recorded"):
        manager_audit.record("install", "sc2")
