"""`llmctl audit show | verify | checkpoint`, and `record` for every action worth auditing.

The log is `<data>/audit.log` (registry/audit.py describes the format: a hash-chained JSON Lines file
with signed checkpoints in `<data>/audit.log.checkpoints`). Entries name the local user and host as
the actor. Callers pass no secrets in details (keys named like one are redacted anyway).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from manager import keys, signing
from manager.errors import LlmctlError
from manager.paths import data_dir
from registry.audit import AuditError, AuditLog, Checkpoint, VerifyReport, default_actor
from registry.keys import load_public_key

HEADER = ("SEQ", "TIME", "EVENT", "OUTCOME", "SUBJECT", "ACTOR")


class AuditWriteError(LlmctlError):
    """An audit entry could not be written: the action it describes is not on the record."""


def log_path() -> Path:
    return data_dir() / "audit.log"


def audit_log() -> AuditLog:
    return AuditLog(log_path())


def record(event: str, subject: str, /, outcome: str = "ok", **details: Any) -> None:
    """Append one entry (actor: this user@host). An I/O problem raises AuditWriteError: an audit
    failure is never silent, the caller decides whether the action may go on without its record.
    A bad event name or outcome raises ValueError (a bug in the caller)."""
    try:
        audit_log().append(event, subject, outcome, details, actor=default_actor())
    except AuditError as e:
        raise AuditWriteError(f"the {event} of {subject!r} was not recorded in the audit log: {e}") from None


def show(as_json: bool = False) -> str:
    """The entries as a table (SEQ TIME EVENT OUTCOME SUBJECT ACTOR) or as a JSON array (every field)."""
    entries = audit_log().entries()
    if as_json:
        return json.dumps([e.to_dict() for e in entries], indent=2, ensure_ascii=False)
    if not entries:
        return f"no audit entries yet ({log_path()})"
    rows = [HEADER] + [
        (str(e.seq), e.time.split(".")[0].rstrip("Z") + "Z", e.event, e.outcome, e.subject, e.actor) for e in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def verify(public_key_files: Sequence[Path] | None = None) -> VerifyReport:
    """Check the chain and every checkpoint, whose signatures must verify with one of the given public
    keys (default: every public key in the key store). Tampering is reported, not raised."""
    if public_key_files is None:
        files = [k.public_key for k in keys.list_keys()]
    else:
        files = list(public_key_files)
    public_keys = []
    for path in files:
        try:
            pem = Path(path).read_bytes()
        except OSError as e:
            raise keys.KeyStoreError(f"{path}: cannot read the public key: {e.strerror or e}") from None
        public_keys.append(load_public_key(pem, str(path)))
    return audit_log().verify(public_keys=public_keys)


def checkpoint(key_name_or_path: str | None = None) -> Checkpoint:
    """Sign the log's newest entry with a private key: a name in the key store, a path, or (None) the
    store's `cosign` key; its password comes from LLMCTL_KEY_PASSWORD or a prompt."""
    path = signing.signing_key_file(key_name_or_path)
    if path is None:
        raise keys.KeyStoreError(
            f"no {signing.DEFAULT_KEY!r} key in {keys.keys_dir()}: create one with `llmctl key generate` or pass --key"
        )
    return audit_log().checkpoint(signing.load_signing_key(path))
