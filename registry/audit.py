"""An append-only, tamper-evident audit log: a hash-chained JSON Lines file with signed checkpoints.

Each line is one entry::

    {"seq":1,"time":"2025-01-02T03:04:05.678Z","event":"install","actor":"alice@build-1",
     "subject":"sc2","outcome":"ok","details":{...},"prev":"sha256:000...0","hash":"sha256:..."}

``hash`` is ``sha256:`` + the SHA-256 of the canonical JSON (sorted keys, compact, UTF-8) of the entry
without its ``hash`` field; ``prev`` is the previous entry's ``hash`` (64 zeros for the first). So an
edited entry no longer matches its hash, and an entry whose hash was recomputed no longer matches the
next entry's ``prev``; removed or reordered entries break ``seq`` and ``prev``.

A chain alone does not stop someone who rewrites the whole file and recomputes every hash, or who cuts
off its tail. Signed checkpoints do (as in transparency logs): `AuditLog.checkpoint` signs
``(seq, hash)`` of the newest entry with an ECDSA P-256 key and appends it to ``<log>.checkpoints``;
`AuditLog.verify` with the public keys then requires the log to still hold entry ``seq`` with that
``hash``. What remains undetectable: changes to entries after the newest checkpoint that rewrite
them consistently (or cut them off), and deleting the log together with its checkpoints. Copy
checkpoints elsewhere (they are small) to anchor the log outside this machine.

Secrets: callers must pass no passwords, tokens or keys in ``details``. As a second line of defence
`AuditLog.append` replaces the value of any ``details`` key named like a secret (password, passphrase,
token, secret, authorization, auth, api key, private key, credentials, cookie) with ``[REDACTED]``, at
any depth, and removes ``user:password@`` from URLs in ``subject`` and in string values.

Writers are serialised across processes with ``flock`` on the log file itself; every entry is one
``write`` of a whole line followed by ``fsync``. The log and the checkpoint file are created mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import getpass
import hashlib
import json
import math
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from registry.cosign import sign_bytes
from registry.errors import RegistryError
from registry.keys import fingerprint

GENESIS = "sha256:" + "0" * 64
OUTCOMES = ("ok", "denied", "failed")
# The events llmctl records; `append` accepts any name matching EVENT_RE so new verbs need no change here.
KNOWN_EVENTS = (
    "build", "sign", "push", "pull", "mirror", "verify", "policy", "install", "upgrade", "rollback",
    "uninstall", "start", "stop", "apply", "key",
)  # fmt: skip
EVENT_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
CHECKPOINT_TYPE = "llmctl-audit-checkpoint/v1"
REDACTED = "[REDACTED]"
FIELDS = ("seq", "time", "event", "actor", "subject", "outcome", "details", "prev", "hash")
CHECKPOINT_FIELDS = ("seq", "hash", "time", "key", "signature")
MAX_PROBLEMS = 50  # verify stops listing problems after this many (the first one is what matters)

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
_SECRET_KEY_RE = re.compile(
    r"(^|[^a-z])(password|passwd|passphrase|token|secrets?|authorization|auth|api_?key|private_?key"
    r"|credentials?|cookie|bearer)($|[^a-z])"
)
_URL_USERINFO_RE = re.compile(r"(?<=://)[^/@\s]+@")
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


class AuditError(RegistryError):
    """The audit log or its checkpoint file cannot be read or written, or is malformed."""


# --- entries -----------------------------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8: the bytes an entry's hash and a checkpoint's signature cover."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def entry_hash(body: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the canonical JSON of an entry without its ``hash`` field."""
    return "sha256:" + hashlib.sha256(canonical_json({k: v for k, v in body.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One audit log entry, as stored."""

    seq: int
    time: str  # RFC 3339, UTC, "Z"
    event: str
    actor: str  # user@host
    subject: str  # image, release or reference the event is about
    outcome: str  # one of OUTCOMES
    details: dict[str, Any]
    prev: str  # the previous entry's hash, GENESIS for the first
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that entry `seq` of the log has hash `hash`."""

    seq: int
    hash: str
    time: str
    key: str  # fingerprint (sha256:<hex> of the SPKI DER) of the signing key
    signature: str  # base64 ECDSA-SHA256 (ASN.1 DER) over `signed_body()`

    def signed_body(self) -> bytes:
        return checkpoint_body(self.seq, self.hash, self.time, self.key)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CHECKPOINT_FIELDS}


def checkpoint_body(seq: int, hash_: str, time: str, key: str) -> bytes:
    """The bytes a checkpoint signature covers: canonical JSON of its type, seq, hash, time and key."""
    return canonical_json({"type": CHECKPOINT_TYPE, "seq": seq, "hash": hash_, "time": time, "key": key})


@dataclass
class VerifyReport:
    """What `AuditLog.verify` found; `ok` when `problems` is empty."""

    path: Path
    entries: int = 0  # lines that parsed as entries
    head: str = GENESIS  # hash of the last entry
    checkpoints: int = 0
    checkpoints_verified: int = 0  # signature checked with a trusted key and matched by the log
    first_bad_line: int | None = None  # line of the log (or None: the problem is in the checkpoints)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "entries": self.entries,
            "head": self.head,
            "checkpoints": self.checkpoints,
            "checkpoints_verified": self.checkpoints_verified,
            "first_bad_line": self.first_bad_line,
            "problems": list(self.problems),
        }


def default_actor() -> str:
    """``user@host`` of this process (the uid when the user has no name)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_secret_key(name: str) -> bool:
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    return bool(_SECRET_KEY_RE.search(snake))


def _strip_userinfo(text: str) -> str:
    return _URL_USERINFO_RE.sub(REDACTED + "@", text) if "://" in text else text


def _clean(value: Any, where: str) -> Any:
    """JSON-ready copy of a details value: secrets redacted, paths and other objects as strings."""
    if isinstance(value, Mapping):
        return {str(k): REDACTED if _is_secret_key(str(k)) else _clean(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_clean(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit detail {where} is {value!r}: JSON has no such number")
        return value
    return _strip_userinfo(value if isinstance(value, str) else str(value))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate field {k!r}")
        out[k] = v
    return out


def _load_object(raw: bytes) -> dict[str, Any]:
    """One JSON object from a line; ValueError (with the reason) when it is not one."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 (corrupt line)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno}; corrupt line)") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object (corrupt line)")
    return obj


def _check_fields(obj: dict[str, Any], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in obj]
    if missing:
        raise ValueError(f"field {missing[0]!r} is missing")
    extra = sorted(set(obj) - set(names))
    if extra:
        raise ValueError(f"unexpected field {extra[0]!r}")


def _positive_int(obj: dict[str, Any], name: str) -> int:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"field {name!r} is {value!r}, not a positive integer")
    return value


def _str_field(obj: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None) -> str:
    value = obj[name]
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        raise ValueError(f"field {name!r} is {value!r}, not {'a string' if pattern is None else 'well formed'}")
    return value


def parse_entry(raw: bytes) -> Entry:
    """An entry from one line (without its newline); ValueError saying why when it is not one.
    The hash is not checked here (`AuditLog.verify` does)."""
    obj = _load_object(raw)
    _check_fields(obj, FIELDS)
    outcome = _str_field(obj, "outcome")
    if outcome not in OUTCOMES:
        raise ValueError(f"field 'outcome' is {outcome!r}, not one of {', '.join(OUTCOMES)}")
    if not isinstance(obj["details"], dict):
        raise ValueError("field 'details' is not a JSON object")
    return Entry(
        seq=_positive_int(obj, "seq"),
        time=_str_field(obj, "time", _TIME_RE),
        event=_str_field(obj, "event", EVENT_RE),
        actor=_str_field(obj, "actor"),
        subject=_str_field(obj, "subject"),
        outcome=outcome,
        details=obj["details"],
        prev=_str_field(obj, "prev", _DIGEST_RE),
        hash=_str_field(obj, "hash", _DIGEST_RE),
    )


def parse_checkpoint(raw: bytes) -> Checkpoint:
    """A checkpoint from one line of the checkpoint file; ValueError saying why when it is not one."""
    obj = _load_object(raw)
    _check_fields(obj, CHECKPOINT_FIELDS)
    return Checkpoint(
        seq=_positive_int(obj, "seq"),
        hash=_str_field(obj, "hash", _DIGEST_RE),
        time=_str_field(obj, "time", _TIME_RE),
        key=_str_field(obj, "key", _DIGEST_RE),
        signature=_str_field(obj, "signature"),
    )


def _lines(data: bytes) -> list[bytes]:
    """The lines of a file; a last line without its newline is kept (verify reports it)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


# --- the log -----------------------------------------------------------------------------------


class AuditLog:
    """The audit log at `path` and its checkpoint file ``<path>.checkpoints``.

    `append` and `checkpoint` hold an exclusive ``flock`` on the log; `entries` and `verify` hold a
    shared one, so they never see half of an entry another process is writing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoint_path = self.path.with_name(self.path.name + ".checkpoints")

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    # --- locking and raw I/O ---

    def _open(self, *, create: bool) -> int | None:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            if not create:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                _fsync_dir(self.path.parent)
            except FileExistsError:
                fd = os.open(self.path, flags)
            return fd
        except FileNotFoundError:
            if create:
                raise AuditError(f"{self.path}: cannot create the audit log: directory missing") from None
            return None
        except OSError as e:
            raise AuditError(f"{self.path}: cannot open the audit log: {e.strerror or e}") from None

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[int | None]:
        """The log's file descriptor under flock (None: no log yet and not `exclusive`)."""
        fd = self._open(create=exclusive)
        if fd is None:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _read_all(self, fd: int) -> bytes:
        try:
            return os.pread(fd, os.fstat(fd).st_size, 0)
        except OSError as e:
            raise AuditError(f"{self.path}: cannot read the audit log: {e.strerror or e}") from None

    def _last_entry(self, fd: int) -> Entry | None:
        """The last entry, read backwards from the end of the file (no full scan)."""
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        tail, pos = b"", size
        while pos > 0:
            step = min(pos, 8192)
            pos -= step
            tail = os.pread(fd, step, pos) + tail
            if b"\n" in tail[:-1]:
                break
        if not tail.endswith(b"\n"):
            lineno = self._read_all(fd).count(b"\n") + 1
            raise AuditError(
                f"{self.path}:{lineno}: the last line is incomplete (an interrupted write or truncation); "
                "nothing was appended: run `llmctl audit verify`"
            )
        last = tail[:-1].rsplit(b"\n", 1)[-1]
        try:
            return parse_entry(last)
        except ValueError as e:
            lineno = self._read_all(fd).count(b"\n")
            raise AuditError(
                f"{self.path}:{lineno}: the last entry is unreadable ({e}); nothing was appended: "
                "run `llmctl audit verify`"
            ) from None

    # --- writing ---

    def append(
        self,
        event: str,
        subject: str,
        outcome: str = "ok",
        details: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> Entry:
        """Append one entry chained to the last one, durably (fsync) and safely across processes.

        `details` must hold no secrets (keys named like one are redacted anyway); values must be JSON
        numbers, strings, booleans, null, lists or mappings (other objects are stored as ``str``).
        Raises ValueError for a bad event name, outcome or non-finite number (caller bugs) and
        AuditError when the log cannot be read or written."""
        if not isinstance(event, str) or not EVENT_RE.match(event):
            raise ValueError(f"audit event {event!r} is not a lower-case name like 'install'")
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        clean_details = _clean(dict(details or {}), "details")
        with self._locked(exclusive=True) as fd:
            assert fd is not None
            last = self._last_entry(fd)
            body: dict[str, Any] = {
                "seq": last.seq + 1 if last else 1,
                "time": utc_now(),
                "event": event,
                "actor": actor if actor is not None else default_actor(),
                "subject": _strip_userinfo(str(subject)),
                "outcome": outcome,
                "details": clean_details,
                "prev": last.hash if last else GENESIS,
            }
            body["hash"] = entry_hash(body)
            _write_line(fd, canonical_json(body) + b"\n", self.path)
        return Entry(**body)

    def checkpoint(self, private_key: ec.EllipticCurvePrivateKey) -> Checkpoint:
        """Sign the newest entry's (seq, hash) with `private_key` and append it to the checkpoint file.

        Refuses (AuditError) when the log is empty or fails verification: a checkpoint must never
        vouch for a log that was already tampered with. Checkpoint signatures are not checked here
        (no trusted keys are given); `verify(public_keys=...)` does that."""
        if not self.path.exists():
            raise AuditError(f"{self.path}: there is no audit log yet; there is nothing to checkpoint")
        with self._locked(exclusive=True) as fd:
            assert fd is not None
            report = self._verify(self._read_all(fd), public_keys=None)
            if not report.ok:
                raise AuditError(
                    f"{self.path}: refusing to checkpoint a log that fails verification: {report.problems[0]}"
                )
            if report.entries == 0:
                raise AuditError(f"{self.path}: the audit log is empty; there is nothing to checkpoint")
            time, key = utc_now(), fingerprint(private_key)
            body = checkpoint_body(report.entries, report.head, time, key)
            cp = Checkpoint(report.entries, report.head, time, key, sign_bytes(body, private_key))
            try:
                cfd = os.open(self.checkpoint_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise AuditError(f"{self.checkpoint_path}: cannot open: {e.strerror or e}") from None
            try:
                _write_line(cfd, canonical_json(cp.to_dict()) + b"\n", self.checkpoint_path)
            finally:
                os.close(cfd)
        return cp

    # --- reading ---

    def entries(self) -> list[Entry]:
        """Every entry, in file order (hashes are not checked: `verify` does that). An absent log
        has none; an unreadable line raises AuditError naming the file and line."""
        with self._locked(exclusive=False) as fd:
            if fd is None:
                return []
            data = self._read_all(fd)
        out = []
        for lineno, raw in enumerate(_lines(data), 1):
            try:
                out.append(parse_entry(raw))
            except ValueError as e:
                raise AuditError(f"{self.path}:{lineno}: {e}; run `llmctl audit verify`") from None
        return out

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint in the checkpoint file (signatures not checked)."""
        out = []
        for lineno, raw in enumerate(_lines(self._read_checkpoints()), 1):
            try:
                out.append(parse_checkpoint(raw))
            except ValueError as e:
                raise AuditError(f"{self.checkpoint_path}:{lineno}: {e}") from None
        return out

    def _read_checkpoints(self) -> bytes:
        try:
            return self.checkpoint_path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as e:
            raise AuditError(f"{self.checkpoint_path}: cannot read: {e.strerror or e}") from None

    def verify(self, public_keys: Sequence[ec.EllipticCurvePublicKey] | None = None) -> VerifyReport:
        """Check the chain and the checkpoints; never raises for tampering, it reports it.

        Entries: each line parses, its hash matches its content, seq counts up from 1 by one and prev
        is the previous entry's hash. Checkpoints: each parses; with `public_keys`, each is signed by
        one of them and the log still holds entry ``seq`` with that ``hash`` (this catches truncation
        and a history rewritten with recomputed hashes). With `public_keys` None the signatures are
        not checked (only that the log matches); an empty sequence trusts no key."""
        with self._locked(exclusive=False) as fd:
            data = b"" if fd is None else self._read_all(fd)
            return self._verify(data, public_keys)

    def _verify(self, data: bytes, public_keys: Sequence[ec.EllipticCurvePublicKey] | None) -> VerifyReport:
        report = VerifyReport(self.path)

        def problem(text: str, lineno: int | None) -> None:
            if report.first_bad_line is None and lineno is not None:
                report.first_bad_line = lineno
            if len(report.problems) < MAX_PROBLEMS:
                report.problems.append(text)
            elif len(report.problems) == MAX_PROBLEMS:
                report.problems.append("... (further problems not listed)")

        by_seq: dict[int, str] = {}
        prev_seq: int | None = 0  # None after an unreadable line: the next entry cannot be linked
        prev_hash: str | None = GENESIS
        lines = _lines(data)
        for lineno, raw in enumerate(lines, 1):
            where = f"{self.path}:{lineno}"
            if lineno == len(lines) and not data.endswith(b"\n"):
                problem(f"{where}: the last line has no newline: an interrupted write or a truncated file", lineno)
            try:
                entry = parse_entry(raw)
            except ValueError as e:
                problem(f"{where}: {e}", lineno)
                prev_seq, prev_hash = None, None
                continue
            report.entries += 1
            why = []
            actual = entry_hash(_load_object(raw))
            if actual != entry.hash:
                why.append("its hash does not match its content: the entry was edited after it was written")
            if prev_seq is not None and entry.seq != prev_seq + 1:
                if entry.seq > prev_seq + 1:
                    why.append(f"seq {entry.seq} follows seq {prev_seq}: entries were removed")
                else:
                    why.append(f"seq {entry.seq} follows seq {prev_seq}: entries were reordered or duplicated")
            if prev_hash is not None and entry.prev != prev_hash:
                why.append(
                    "its prev is not the previous entry's hash: an entry before it was removed, reordered, "
                    "or edited with its hash recomputed"
                )
            if why:
                problem(f"{where} (seq {entry.seq}): {'; '.join(why)}", lineno)
            by_seq.setdefault(entry.seq, entry.hash)
            prev_seq, prev_hash = entry.seq, entry.hash
            report.head = entry.hash
        self._verify_checkpoints(report, by_seq, public_keys, problem)
        return report

    def _verify_checkpoints(
        self,
        report: VerifyReport,
        by_seq: Mapping[int, str],
        public_keys: Sequence[ec.EllipticCurvePublicKey] | None,
        problem: Callable[[str, int | None], None],
    ) -> None:
        trusted = {fingerprint(k): k for k in public_keys or ()}
        last_seq = max(by_seq, default=0)
        prev_cp = 0
        for lineno, raw in enumerate(_lines(self._read_checkpoints()), 1):
            where = f"{self.checkpoint_path}:{lineno}"
            try:
                cp = parse_checkpoint(raw)
            except ValueError as e:
                problem(f"{where}: {e}", None)
                continue
            report.checkpoints += 1
            signed = False
            if public_keys is not None:
                key = trusted.get(cp.key)
                if key is None:
                    names = ", ".join(trusted) or "none given"
                    problem(
                        f"{where}: checkpoint of seq {cp.seq} is signed by key {cp.key}, which is not one of the "
                        f"{len(trusted)} trusted key(s) ({names})",
                        None,
                    )
                    continue
                try:
                    key.verify(base64.b64decode(cp.signature, validate=True), cp.signed_body(), _ECDSA_SHA256)
                    signed = True
                except (InvalidSignature, binascii.Error, ValueError):
                    problem(
                        f"{where}: the signature of the checkpoint of seq {cp.seq} does not verify with key "
                        f"{cp.key}: the checkpoint was altered or forged",
                        None,
                    )
                    continue
            if cp.seq < prev_cp:
                problem(
                    f"{where}: checkpoint of seq {cp.seq} follows one of seq {prev_cp}: checkpoints reordered", None
                )
            prev_cp = max(prev_cp, cp.seq)
            if cp.seq not in by_seq:
                if cp.seq > last_seq:
                    problem(
                        f"{self.path}: holds entries up to seq {last_seq} but the checkpoint at {where} covers "
                        f"seq {cp.seq}: the log was truncated",
                        None,
                    )
                else:
                    problem(f"{self.path}: entry seq {cp.seq}, covered by the checkpoint at {where}, is missing", None)
            elif by_seq[cp.seq] != cp.hash:
                problem(
                    f"{self.path}: entry seq {cp.seq} has hash {by_seq[cp.seq]} but the checkpoint at {where} "
                    f"signed {cp.hash}: history up to seq {cp.seq} was rewritten",
                    None,
                )
            elif signed:
                report.checkpoints_verified += 1


def _write_line(fd: int, data: bytes, path: Path) -> None:
    """Write all of `data` at the end of the file and fsync it."""
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except OSError as e:
        hint = ": the disk is full" if e.errno == errno.ENOSPC else ""
        raise AuditError(f"{path}: cannot write the audit entry: {e.strerror or e}{hint}") from None


def _fsync_dir(directory: Path) -> None:
    """Make a newly created file's directory entry durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
