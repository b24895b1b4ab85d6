"""The release store: every revision of every release, in SQLite (``<data>/releases.db``).

Like Helm's release storage, one row per (release, revision) holds what was installed (chart,
values, rendered manifest, image and digest), where it runs (driver, endpoint, instance id) and
its status. The latest revision is the release's state; older ones are its history (rollback
targets), pruned to ``HISTORY_MAX``.

Mutating commands (install, upgrade, rollback, uninstall) run inside ``operation(name, verb)``, a
per-release lock kept as a row in the same database. A holder that died (``kill -9``, a reboot)
does not block anyone: the lock records its pid, host, boot id and process start time, and a lock
whose process is gone, or whose pid now belongs to a different process, is taken over. The new
holder then calls ``recover(name)``, which marks the revisions the dead one left pending as failed.

The database runs in WAL mode with a busy timeout; every write is one ``BEGIN IMMEDIATE``
transaction, so an interrupted command leaves the previous state. ``schema_version`` records the
schema for future migrations; a database written by a newer llmctl is refused, never rewritten.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from manager.errors import LlmctlError
from manager.paths import data_dir

DB_NAME = "releases.db"
SCHEMA_VERSION = 1
HISTORY_MAX = 10
BUSY_TIMEOUT_MS = 10_000
POLL_SECONDS = 0.1

STATUSES = (
    "pending-install",
    "pending-upgrade",
    "pending-rollback",
    "deployed",
    "failed",
    "superseded",
    "uninstalling",
    "uninstalled",
)
PENDING = frozenset({"pending-install", "pending-upgrade", "pending-rollback", "uninstalling"})
LISTED = frozenset({"deployed", "failed"}) | PENDING  # what `llmctl list` shows without -a
DRIVERS = ("docker", "process", "swarm", "kubernetes")
# the verbs that take the lock, and how the busy message says them
VERBS = {"install": "installed", "upgrade": "upgraded", "rollback": "rolled back", "uninstall": "uninstalled"}
MUTABLE_FIELDS = frozenset({"endpoint", "instance_id", "image_digest"})  # what set_status may change

_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,51}[a-z0-9])?")


# -- errors ---------------------------------------------------------------------------------------


class ReleaseError(LlmctlError):
    """The release store cannot do what was asked (or the database is unusable)."""


class ReleaseNotFoundError(ReleaseError):
    """No such release, or no such revision of it."""

    def __init__(self, message: str, *, name: str, revision: int | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.revision = revision


class ReleaseBusyError(ReleaseError):
    """Another live llmctl holds the release's lock."""

    def __init__(self, message: str, *, name: str, verb: str, pid: int, hostname: str, started: str) -> None:
        super().__init__(message)
        self.name = name
        self.verb = verb
        self.pid = pid
        self.hostname = hostname
        self.started = started


class ReleaseNameError(ReleaseError):
    """A release name is not a DNS-label-like name."""


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid release name; raise `ReleaseNameError` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ReleaseNameError(
            f"invalid release name {name!r}: use 1-53 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit (for example 'sc2')"
        )
    return name


def utc_now() -> str:
    """The current time as RFC 3339 UTC with seconds: ``2025-01-31T12:00:00Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- records --------------------------------------------------------------------------------------


@dataclass
class Revision:
    """One revision of a release: what was installed, where it runs, and how it went."""

    name: str  # release name (validate_name)
    revision: int  # 1, 2, ...
    status: str  # one of STATUSES
    chart: str  # chart name
    chart_version: str
    app_version: str
    values: dict[str, Any]  # the user-supplied values (stored as JSON)
    manifest: str  # the rendered Model manifest text
    image: str  # image tag, e.g. llmctl/demo:1.0.0
    image_digest: str  # sha256:...
    driver: str  # one of DRIVERS
    endpoint: str | None = None  # e.g. http://127.0.0.1:8080
    instance_id: str | None = None  # container id or process instance id
    description: str = ""  # "Install complete", "Upgrade failed: health check timed out", ...
    created: str = field(default_factory=utc_now)  # RFC 3339 UTC
    updated: str = field(default_factory=utc_now)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (``values`` is a copy)."""
        return asdict(self)

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Revision:
        return cls(
            name=row["name"],
            revision=row["revision"],
            status=row["status"],
            chart=row["chart"],
            chart_version=row["chart_version"],
            app_version=row["app_version"],
            values=json.loads(row["values_json"]),
            manifest=row["manifest"],
            image=row["image"],
            image_digest=row["image_digest"],
            driver=row["driver"],
            endpoint=row["endpoint"],
            instance_id=row["instance_id"],
            description=row["description"],
            created=row["created"],
            updated=row["updated"],
        )


@dataclass(frozen=True)
class Operation:
    """A held release lock, as yielded by `ReleaseStore.operation`."""

    name: str
    verb: str
    token: str  # identifies this acquisition (several threads of one process may compete)
    pid: int
    started: str
    took_over: str | None  # set when a dead holder's lock was taken over: what it was doing


# -- schema ---------------------------------------------------------------------------------------

# version -> statements that bring the previous version to it; append, never edit
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE revisions (
            name TEXT NOT NULL,
            revision INTEGER NOT NULL,
            status TEXT NOT NULL,
            chart TEXT NOT NULL,
            chart_version TEXT NOT NULL,
            app_version TEXT NOT NULL,
            values_json TEXT NOT NULL,
            manifest TEXT NOT NULL,
            image TEXT NOT NULL,
            image_digest TEXT NOT NULL,
            driver TEXT NOT NULL,
            endpoint TEXT,
            instance_id TEXT,
            description TEXT NOT NULL,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            PRIMARY KEY (name, revision)
        )""",
        "CREATE INDEX revisions_status ON revisions (status)",
        """CREATE TABLE locks (
            name TEXT PRIMARY KEY,
            token TEXT NOT NULL,
            pid INTEGER NOT NULL,
            hostname TEXT NOT NULL,
            boot_id TEXT,
            start_time INTEGER,
            verb TEXT NOT NULL,
            started TEXT NOT NULL
        )""",
    ),
}

_COLUMNS = (
    "name",
    "revision",
    "status",
    "chart",
    "chart_version",
    "app_version",
    "values_json",
    "manifest",
    "image",
    "image_digest",
    "driver",
    "endpoint",
    "instance_id",
    "description",
    "created",
    "updated",
)


# -- process identity (who holds a lock, and is it still alive) -----------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat, or None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 2 (comm) is in parentheses and may itself contain ") "; fields 3.. follow the last ")"
    rest = text[text.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[22 - 3])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _process_alive(pid: int, start_time: int | None) -> bool:
    """Whether ``pid`` on this host is still the process that recorded ``start_time``."""
    if pid <= 0:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False  # /proc works and the pid is not in it
        try:  # no /proc (not Linux): existence is all we can check
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, started = stat
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return start_time is None or started == start_time


def _holder_alive(row: sqlite3.Row) -> bool:
    if row["hostname"] != socket.gethostname():
        return True  # another machine's processes cannot be checked from here
    boot_id = _boot_id()
    if row["boot_id"] and boot_id and row["boot_id"] != boot_id:
        return False  # recorded before the last reboot
    return _process_alive(row["pid"], row["start_time"])


def _ranges(numbers: Iterable[int]) -> str:
    """``1-3, 5, 7-8`` for [1, 2, 3, 5, 7, 8]."""
    parts: builtins.list[str] = []
    start = prev = None
    for n in sorted(numbers):
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
        start = prev = n
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(parts)


# -- the store ------------------------------------------------------------------------------------


class ReleaseStore:
    """Releases and their revisions in one SQLite file; safe to use from several processes and threads.

    Every method opens its own connection, so one store may be shared between threads. Database
    failures (unreadable file, disk full, a writer that holds the database longer than the busy
    timeout) are raised as `ReleaseError` naming the file.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else data_dir() / DB_NAME
        self._init()

    # -- connections and transactions

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise ReleaseError(f"release store {self.path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads, inside a (deferred) transaction: one consistent snapshot."""
        with self._errors():
            conn = self._connect()
            try:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    conn.execute("ROLLBACK")
            finally:
                conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed if the block finishes, rolled back otherwise."""
        with self._errors():
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                conn.close()

    def _init(self) -> None:
        """Create the file (mode 0600: values may hold secrets), switch to WAL and migrate."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as e:
            raise ReleaseError(f"cannot create the release store {self.path}: {e.strerror}") from e
        with self._errors():
            conn = self._connect()
            try:
                self._enable_wal(conn)
            finally:
                conn.close()
        with self._write() as conn:
            self._migrate(conn)

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # switching the journal mode needs the database to itself; racing first opens retry
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(POLL_SECONDS)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, updated TEXT NOT NULL)"
        )
        row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        current = row["version"] if row else 0
        if current > SCHEMA_VERSION:
            raise ReleaseError(
                f"release store {self.path} has schema version {current}, but this llmctl knows only "
                f"up to {SCHEMA_VERSION}; upgrade llmctl"
            )
        if current == SCHEMA_VERSION:
            return
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (id, version, updated) VALUES (1, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET version = excluded.version, updated = excluded.updated",
            (SCHEMA_VERSION, utc_now()),
        )

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._read() as conn:
            return int(conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()["version"])

    # -- revisions

    def next_revision(self, name: str) -> int:
        """The number the next revision of ``name`` gets: 1 for a new (or deleted) release."""
        validate_name(name)
        with self._read() as conn:
            row = conn.execute("SELECT MAX(revision) AS m FROM revisions WHERE name = ?", (name,)).fetchone()
        return (row["m"] or 0) + 1

    def add(self, rev: Revision) -> None:
        """Store a new revision; `ReleaseError` if (name, revision) exists or a field is invalid."""
        validate_name(rev.name)
        _check_status(rev.status)
        if not isinstance(rev.revision, int) or rev.revision < 1:
            raise ReleaseError(f"release '{rev.name}': revision must be a positive integer, not {rev.revision!r}")
        if rev.driver not in DRIVERS:
            raise ReleaseError(
                f"release '{rev.name}': unknown driver {rev.driver!r} (expected one of {', '.join(DRIVERS)})"
            )
        try:
            values_json = json.dumps(rev.values)
        except (TypeError, ValueError) as e:
            raise ReleaseError(f"release '{rev.name}': values are not JSON-serialisable: {e}") from e
        row = {**rev.to_json(), "values_json": values_json}
        sql = f"INSERT INTO revisions ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        with self._write() as conn:
            try:
                conn.execute(sql, tuple(row[c] for c in _COLUMNS))
            except sqlite3.IntegrityError as e:
                raise ReleaseError(f"release '{rev.name}' already has a revision {rev.revision}") from e

    def set_status(self, name: str, revision: int, status: str, description: str | None = None, **fields: Any) -> None:
        """Change a revision's status (and description, and `MUTABLE_FIELDS`); refreshes ``updated``."""
        validate_name(name)
        _check_status(status)
        unknown = sorted(set(fields) - MUTABLE_FIELDS)
        if unknown:
            raise TypeError(
                f"set_status() cannot change {', '.join(unknown)} (only {', '.join(sorted(MUTABLE_FIELDS))})"
            )
        changes: dict[str, Any] = {"status": status, "updated": utc_now(), **fields}
        if description is not None:
            changes["description"] = description
        assignments = ", ".join(f"{column} = ?" for column in changes)
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE revisions SET {assignments} WHERE name = ? AND revision = ?",
                (*changes.values(), name, revision),
            )
            if cursor.rowcount == 0:
                raise self._not_found(conn, name, revision)

    def get(self, name: str, revision: int | None = None) -> Revision:
        """One revision (the latest when ``revision`` is None); `ReleaseNotFoundError` if there is none."""
        validate_name(name)
        with self._read() as conn:
            if revision is None:
                row = conn.execute(
                    "SELECT * FROM revisions WHERE name = ? ORDER BY revision DESC LIMIT 1", (name,)
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT * FROM revisions WHERE name = ? AND revision = ?", (name, revision)
                ).fetchone()
            if row is None:
                raise self._not_found(conn, name, revision)
        return Revision._from_row(row)

    def history(self, name: str) -> builtins.list[Revision]:
        """Every stored revision of ``name``, oldest first; `ReleaseNotFoundError` if there is none."""
        validate_name(name)
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM revisions WHERE name = ? ORDER BY revision", (name,)).fetchall()
            if not rows:
                raise self._not_found(conn, name, None)
        return [Revision._from_row(r) for r in rows]

    def list(self, all: bool = False) -> builtins.list[Revision]:
        """The latest revision of each release, by name: deployed, failed or pending ones (``all``: every one)."""
        sql = (
            "SELECT r.* FROM revisions r JOIN (SELECT name, MAX(revision) AS latest FROM revisions GROUP BY name) l "
            "ON r.name = l.name AND r.revision = l.latest"
        )
        params: tuple[str, ...] = ()
        if not all:
            sql += f" WHERE r.status IN ({', '.join('?' * len(LISTED))})"
            params = tuple(sorted(LISTED))
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY r.name", params).fetchall()
        return [Revision._from_row(r) for r in rows]

    def deployed(self, name: str) -> Revision | None:
        """The current deployed revision of ``name`` (the latest one marked deployed), or None."""
        validate_name(name)
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM revisions WHERE name = ? AND status = 'deployed' ORDER BY revision DESC LIMIT 1",
                (name,),
            ).fetchone()
        return Revision._from_row(row) if row else None

    def delete(self, name: str) -> int:
        """Delete every revision of ``name`` (uninstall without --keep-history); returns how many."""
        validate_name(name)
        with self._write() as conn:
            count = conn.execute("DELETE FROM revisions WHERE name = ?", (name,)).rowcount
            if count == 0:
                raise self._not_found(conn, name, None)
        return int(count)

    def prune(self, name: str, keep: int = HISTORY_MAX) -> builtins.list[int]:
        """Delete revisions older than the newest ``keep``; returns the deleted revision numbers.

        Never deletes the latest revision, a deployed one (the rollback target of a failed
        upgrade) or a pending one. ``keep <= 0`` means no limit (as Helm's ``--history-max 0``).
        """
        validate_name(name)
        if keep <= 0:
            return []
        with self._write() as conn:
            rows = conn.execute(
                "SELECT revision, status FROM revisions WHERE name = ? ORDER BY revision DESC", (name,)
            ).fetchall()
            doomed = [r["revision"] for r in rows[keep:] if r["status"] != "deployed" and r["status"] not in PENDING]
            conn.executemany("DELETE FROM revisions WHERE name = ? AND revision = ?", [(name, n) for n in doomed])
        return sorted(doomed)

    def _not_found(self, conn: sqlite3.Connection, name: str, revision: int | None) -> ReleaseNotFoundError:
        numbers = [r[0] for r in conn.execute("SELECT revision FROM revisions WHERE name = ?", (name,))]
        if not numbers:
            return ReleaseNotFoundError(
                f"release '{name}' not found; `llmctl list -a` shows all releases", name=name, revision=revision
            )
        return ReleaseNotFoundError(
            f"release '{name}' has no revision {revision} (it has {_ranges(numbers)})", name=name, revision=revision
        )

    # -- locking and crash recovery

    @contextlib.contextmanager
    def operation(self, name: str, verb: str, *, wait: float = 0.0) -> Iterator[Operation]:
        """Hold ``name``'s lock for one install/upgrade/rollback/uninstall (``verb``).

        Raises `ReleaseBusyError` at once if another live llmctl holds it, or after polling for
        ``wait`` seconds. A lock whose holder is dead (its pid is gone, is a zombie, belongs to a
        process started at another time, or was recorded before a reboot) is taken over; the
        yielded `Operation` says so in ``took_over``. The lock is released when the block exits,
        also on exceptions. Locks held from another host are treated as live.
        """
        validate_name(name)
        if verb not in VERBS:
            raise ValueError(f"unknown verb {verb!r} (expected one of {', '.join(VERBS)})")
        token = uuid.uuid4().hex
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            op, holder = self._try_lock(name, verb, token)
            if op is not None:
                break
            assert holder is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _busy(name, holder)
            time.sleep(min(POLL_SECONDS, remaining))
        try:
            yield op
        except BaseException:
            # a row left behind belongs to this pid, and is taken over once this process has exited
            with contextlib.suppress(ReleaseError):
                self._unlock(name, token)
            raise
        self._unlock(name, token)

    def _try_lock(self, name: str, verb: str, token: str) -> tuple[Operation | None, sqlite3.Row | None]:
        pid = os.getpid()
        started = utc_now()
        with self._write() as conn:
            holder = conn.execute("SELECT * FROM locks WHERE name = ?", (name,)).fetchone()
            took_over = None
            if holder is not None:
                if _holder_alive(holder):
                    return None, holder
                took_over = (
                    f"took over the lock of pid {holder['pid']} ({holder['verb']} since {holder['started']}), "
                    "which is no longer running"
                )
                conn.execute("DELETE FROM locks WHERE name = ?", (name,))
            conn.execute(
                "INSERT INTO locks (name, token, pid, hostname, boot_id, start_time, verb, started) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, token, pid, socket.gethostname(), _boot_id(), _start_time(pid), verb, started),
            )
        return Operation(name=name, verb=verb, token=token, pid=pid, started=started, took_over=took_over), None

    def _unlock(self, name: str, token: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM locks WHERE name = ? AND token = ?", (name, token))

    def recover(self, name: str) -> builtins.list[str]:
        """Mark every pending revision of ``name`` failed (its command was interrupted); returns notes.

        Must be called inside `operation` for ``name`` by this process: a pending revision is then
        known to belong to a command that died, never to one still running. An interrupted
        ``uninstalling`` becomes ``failed`` too; the caller retries the uninstall.
        """
        validate_name(name)
        pid = os.getpid()
        notes: builtins.list[str] = []
        with self._write() as conn:
            holder = conn.execute("SELECT pid, hostname FROM locks WHERE name = ?", (name,)).fetchone()
            if holder is None or holder["pid"] != pid or holder["hostname"] != socket.gethostname():
                raise RuntimeError(f"recover({name!r}) called without holding the release's lock (use operation())")
            rows = conn.execute(
                "SELECT revision, status FROM revisions "
                f"WHERE name = ? AND status IN ({', '.join('?' * len(PENDING))}) ORDER BY revision",
                (name, *sorted(PENDING)),
            ).fetchall()
            now = utc_now()
            for row in rows:
                old = row["status"]
                conn.execute(
                    "UPDATE revisions SET status = 'failed', description = ?, updated = ? "
                    "WHERE name = ? AND revision = ?",
                    (f"interrupted: {old} did not finish (recovered by pid {pid})", now, name, row["revision"]),
                )
                notes.append(f"release '{name}' revision {row['revision']}: {old} was interrupted; marked failed")
        return notes


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ReleaseError(f"unknown release status {status!r} (expected one of {', '.join(STATUSES)})")


def _busy(name: str, holder: sqlite3.Row) -> ReleaseBusyError:
    where = f"pid {holder['pid']}"
    if holder["hostname"] != socket.gethostname():
        where += f" on {holder['hostname']}"
    return ReleaseBusyError(
        f"release '{name}' is being {VERBS.get(holder['verb'], holder['verb'])} by another llmctl "
        f"({where}, since {holder['started']}); wait for it to finish",
        name=name,
        verb=holder["verb"],
        pid=holder["pid"],
        hostname=holder["hostname"],
        started=holder["started"],
    )
