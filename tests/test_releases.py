"""The release store: records, history, listing and pruning in real SQLite files; the per-release lock
against real processes (live, killed with SIGKILL, exited without unlocking, pid reused) and races."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from manager.errors import LlmctlError
from manager.releases import (
    HISTORY_MAX,
    PENDING,
    SCHEMA_VERSION,
    STATUSES,
    ReleaseBusyError,
    ReleaseError,
    ReleaseNameError,
    ReleaseNotFoundError,
    ReleaseStore,
    Revision,
    validate_name,
)

ROOT = Path(__file__).resolve().parents[1]
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
DIGEST = "sha256:" + "ab" * 32

# Takes the lock in another process, optionally leaves a pending revision, signals through a file
# (written atomically, holding its pid), then sleeps, or exits without unlocking (mode "exit").
HOLDER = textwrap.dedent(
    f"""
    import os, sys, time
    from pathlib import Path
    from manager.releases import ReleaseStore, Revision
    db, name, verb, signal_file, mode, seconds = sys.argv[1:7]
    store = ReleaseStore(Path(db))
    with store.operation(name, verb):
        if mode == "pending":
            store.recover(name)
            store.add(Revision(
                name=name, revision=store.next_revision(name), status="pending-upgrade", chart="demo",
                chart_version="1.1.0", app_version="1.1", values={{}}, manifest="kind: Model\\n",
                image="llmctl/demo:1.1.0", image_digest="{DIGEST}", driver="process",
            ))
        tmp = Path(signal_file + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(signal_file)
        if mode == "exit":
            os._exit(0)
        time.sleep(float(seconds))
    """
)

# Waits for the start file, then tries the lock once; the winner holds it until the done file appears.
RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from manager.releases import ReleaseBusyError, ReleaseStore
    db, name, ready, go, done, result = sys.argv[1:7]
    store = ReleaseStore(Path(db))

    def report(text):
        Path(result + ".tmp").write_text(text)
        Path(result + ".tmp").rename(result)

    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.002)
    try:
        with store.operation(name, "upgrade"):
            report("won")
            while not Path(done).exists():
                time.sleep(0.01)
    except ReleaseBusyError as e:
        report(f"busy {e.pid}")
    """
)


def make_rev(name: str, revision: int, status: str = "deployed", **kw: Any) -> Revision:
    fields: dict[str, Any] = {
        "chart": "demo",
        "chart_version": f"1.{revision}.0",
        "app_version": "1.0",
        "values": {"server": {"threads": revision}, "apiKey": None},
        "manifest": "apiVersion: llmctl.dev/v1\nkind: Model\n",
        "image": f"llmctl/demo:1.{revision}.0",
        "image_digest": DIGEST,
        "driver": "docker",
        "description": f"revision {revision}",
    }
    fields.update(kw)
    return Revision(name=name, revision=revision, status=status, **fields)


def wait_for(path: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"helper process exited with {proc.returncode} before {path.name}: {err.decode()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.01)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "releases.db"


@pytest.fixture
def store(db: Path) -> ReleaseStore:
    return ReleaseStore(db)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Helper processes started by a test; the ones still running are killed (by pid) afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def hold(db: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> Callable[..., subprocess.Popen[bytes]]:
    """Start a process that holds ``name``'s lock; returns once it does."""

    def start(name: str, verb: str = "upgrade", mode: str = "hold", seconds: float = 60) -> subprocess.Popen[bytes]:
        ReleaseStore(db)  # created before the helper opens it
        signal_file = tmp_path / f"holding-{name}-{len(processes)}"
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(db), name, verb, str(signal_file), mode, str(seconds)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        processes.append(proc)
        wait_for(signal_file, proc)
        assert int(signal_file.read_text()) == proc.pid
        return proc

    return start


def lock_row(db: Path, name: str) -> dict[str, Any] | None:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM locks WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()
    return dict(row) if row else None


def edit_lock(db: Path, name: str, **changes: Any) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            sets = ", ".join(f"{k} = ?" for k in changes)
            assert conn.execute(f"UPDATE locks SET {sets} WHERE name = ?", (*changes.values(), name)).rowcount == 1
    finally:
        conn.close()


# -- the database file ----------------------------------------------------------------------------


def test_default_path_wal_schema_and_permissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    store = ReleaseStore()
    assert store.path == tmp_path / "home" / "data" / "releases.db"
    assert store.path.is_file()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.schema_version() == SCHEMA_VERSION
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    store.add(make_rev("sc2", 1))
    assert ReleaseStore().get("sc2").revision == 1  # a second store sees the same file


def test_newer_schema_is_refused(db: Path) -> None:
    ReleaseStore(db)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(ReleaseError, match=r"schema version 99.*upgrade llmctl"):
        ReleaseStore(db)


def test_errors_are_llmctl_errors() -> None:
    for cls in (ReleaseNotFoundError, ReleaseBusyError, ReleaseNameError):
        assert issubclass(cls, ReleaseError)
    assert issubclass(ReleaseError, LlmctlError)


# -- records --------------------------------------------------------------------------------------


def test_add_get_history_round_trip(store: ReleaseStore) -> None:
    assert store.next_revision("sc2") == 1
    store.add(make_rev("sc2", 1, "superseded", endpoint="http://127.0.0.1:8080", instance_id="abc"))
    store.add(make_rev("sc2", 2, "deployed"))
    assert store.next_revision("sc2") == 3

    latest = store.get("sc2")
    assert latest.revision == 2 and latest.status == "deployed" and latest.endpoint is None
    first = store.get("sc2", 1)
    assert first == make_rev("sc2", 1, "superseded", endpoint="http://127.0.0.1:8080", instance_id="abc",
                             created=first.created, updated=first.updated)  # fmt: skip
    assert first.values == {"server": {"threads": 1}, "apiKey": None}
    assert RFC3339.fullmatch(first.created) and RFC3339.fullmatch(first.updated)
    assert [r.revision for r in store.history("sc2")] == [1, 2]

    data = first.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["name"] == "sc2" and data["revision"] == 1 and data["image_digest"] == DIGEST
    data["values"]["server"]["threads"] = 99  # a copy
    assert first.values["server"]["threads"] == 1


def test_add_refuses_duplicates_and_bad_fields(store: ReleaseStore) -> None:
    store.add(make_rev("sc2", 1))
    with pytest.raises(ReleaseError, match="release 'sc2' already has a revision 1"):
        store.add(make_rev("sc2", 1))
    with pytest.raises(ReleaseError, match="unknown release status 'running'"):
        store.add(make_rev("sc2", 2, "running"))
    with pytest.raises(ReleaseError, match="unknown driver 'podman'"):
        store.add(make_rev("sc2", 2, driver="podman"))
    with pytest.raises(ReleaseError, match="positive integer"):
        store.add(make_rev("sc2", 0))
    with pytest.raises(ReleaseError, match="not JSON-serialisable"):
        store.add(make_rev("sc2", 2, values={"x": object()}))
    assert [r.revision for r in store.history("sc2")] == [1]


def test_not_found_messages(store: ReleaseStore) -> None:
    with pytest.raises(ReleaseNotFoundError) as e:
        store.get("nope")
    assert str(e.value) == "release 'nope' not found; `llmctl list -a` shows all releases"
    assert e.value.name == "nope"
    with pytest.raises(ReleaseNotFoundError, match="not found"):
        store.history("nope")
    for n in (1, 2, 3):
        store.add(make_rev("sc2", n, "superseded"))
    with pytest.raises(ReleaseNotFoundError) as e:
        store.get("sc2", 7)
    assert str(e.value) == "release 'sc2' has no revision 7 (it has 1-3)"
    assert e.value.revision == 7


def test_set_status(store: ReleaseStore) -> None:
    store.add(make_rev("sc2", 1, "pending-install", created="2020-01-01T00:00:00Z", updated="2020-01-01T00:00:00Z"))
    store.set_status("sc2", 1, "deployed", "Install complete", endpoint="http://127.0.0.1:9000", instance_id="c0ffee")
    rev = store.get("sc2", 1)
    assert (rev.status, rev.description, rev.endpoint, rev.instance_id) == (
        "deployed",
        "Install complete",
        "http://127.0.0.1:9000",
        "c0ffee",
    )
    assert rev.created == "2020-01-01T00:00:00Z" and rev.updated != rev.created and RFC3339.fullmatch(rev.updated)

    store.set_status("sc2", 1, "superseded")  # description kept when not given
    assert store.get("sc2", 1).description == "Install complete"
    with pytest.raises(ReleaseError, match="unknown release status 'runing'"):
        store.set_status("sc2", 1, "runing")
    with pytest.raises(TypeError, match="cannot change chart"):
        store.set_status("sc2", 1, "failed", chart="other")
    with pytest.raises(ReleaseNotFoundError, match=r"has no revision 2 \(it has 1\)"):
        store.set_status("sc2", 2, "failed")
    assert store.get("sc2", 1).status == "superseded"


def test_list_and_list_all(store: ReleaseStore) -> None:
    store.add(make_rev("a", 1, "deployed"))
    store.add(make_rev("b", 1, "deployed"))
    store.add(make_rev("b", 2, "failed"))
    store.add(make_rev("c", 1, "pending-install"))
    store.add(make_rev("d", 1, "superseded"))
    store.add(make_rev("d", 2, "uninstalled"))
    store.add(make_rev("e", 1, "superseded"))
    store.add(make_rev("e", 2, "deployed"))
    store.add(make_rev("f", 1, "uninstalling"))

    assert [(r.name, r.revision, r.status) for r in store.list()] == [
        ("a", 1, "deployed"),
        ("b", 2, "failed"),
        ("c", 1, "pending-install"),
        ("e", 2, "deployed"),
        ("f", 1, "uninstalling"),
    ]
    assert [(r.name, r.revision) for r in store.list(all=True)] == [
        ("a", 1),
        ("b", 2),
        ("c", 1),
        ("d", 2),
        ("e", 2),
        ("f", 1),
    ]


def test_deployed(store: ReleaseStore) -> None:
    assert store.deployed("sc2") is None
    store.add(make_rev("sc2", 1, "superseded"))
    store.add(make_rev("sc2", 2, "deployed"))
    store.add(make_rev("sc2", 3, "failed", description="Upgrade failed: health check timed out"))
    current = store.deployed("sc2")
    assert current is not None and current.revision == 2
    store.add(make_rev("other", 1, "failed"))
    assert store.deployed("other") is None


def test_delete(store: ReleaseStore) -> None:
    for n in (1, 2):
        store.add(make_rev("sc2", n))
    store.add(make_rev("keep", 1))
    assert store.delete("sc2") == 2
    with pytest.raises(ReleaseNotFoundError):
        store.get("sc2")
    with pytest.raises(ReleaseNotFoundError):
        store.delete("sc2")
    assert store.next_revision("sc2") == 1
    assert store.get("keep").revision == 1


def test_prune_keeps_latest_and_deployed(store: ReleaseStore) -> None:
    for n in range(1, 13):
        store.add(make_rev("sc2", n, "deployed" if n == 3 else "superseded" if n < 12 else "failed"))
    store.add(make_rev("other", 1, "superseded"))
    store.add(make_rev("other", 2, "deployed"))

    assert store.prune("sc2") == [1, 2]  # HISTORY_MAX by default
    assert HISTORY_MAX == 10
    assert [r.revision for r in store.history("sc2")] == list(range(3, 13))

    assert store.prune("sc2", keep=2) == [4, 5, 6, 7, 8, 9, 10]
    assert [r.revision for r in store.history("sc2")] == [3, 11, 12]  # 3 is still deployed
    with pytest.raises(ReleaseNotFoundError, match=r"has no revision 5 \(it has 3, 11-12\)"):
        store.get("sc2", 5)

    assert store.prune("sc2", keep=1) == [11]
    assert [r.revision for r in store.history("sc2")] == [3, 12]
    assert store.prune("sc2", keep=0) == []  # no limit
    assert store.next_revision("sc2") == 13
    assert [r.revision for r in store.history("other")] == [1, 2]


@pytest.mark.parametrize("name", ["a", "sc2", "my-model-1", "0x", "a" * 53])
def test_valid_names(store: ReleaseStore, name: str) -> None:
    assert validate_name(name) == name
    store.add(make_rev(name, 1))
    assert store.get(name).name == name


@pytest.mark.parametrize("name", ["", "A", "Sc2", "-a", "a-", "a_b", "a.b", "a b", "a" * 54, "ä"])
def test_invalid_names(store: ReleaseStore, name: str) -> None:
    with pytest.raises(ReleaseNameError, match=r"invalid release name .*lower-case letters, digits and '-'"):
        store.add(make_rev(name, 1))
    for call in (store.get, store.history, store.deployed, store.delete, store.next_revision):
        with pytest.raises(ReleaseNameError):
            call(name)
    with pytest.raises(ReleaseNameError):
        with store.operation(name, "install"):
            pass


def test_statuses() -> None:
    assert PENDING < set(STATUSES)
    assert "deployed" not in PENDING and "uninstalling" in PENDING


# -- the lock -------------------------------------------------------------------------------------


def test_operation_releases_and_refuses_unknown_verbs(store: ReleaseStore, db: Path) -> None:
    with store.operation("sc2", "install") as op:
        assert (op.name, op.verb, op.pid, op.took_over) == ("sc2", "install", os.getpid(), None)
        row = lock_row(db, "sc2")
        assert row is not None and row["pid"] == os.getpid() and row["verb"] == "install"
        assert row["start_time"] is not None and RFC3339.fullmatch(row["started"])
    assert lock_row(db, "sc2") is None
    with pytest.raises(ValueError, match="unknown verb 'deploy'"):
        with store.operation("sc2", "deploy"):
            pass


def test_lock_released_after_exception(store: ReleaseStore, db: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with store.operation("sc2", "upgrade"):
            raise RuntimeError("boom")
    assert lock_row(db, "sc2") is None
    with store.operation("sc2", "upgrade") as op:
        assert op.took_over is None


def test_live_holder_refuses_others_but_not_other_releases(
    store: ReleaseStore, hold: Callable[..., subprocess.Popen[bytes]]
) -> None:
    proc = hold("sc2", "rollback")
    with pytest.raises(ReleaseBusyError) as e:
        with store.operation("sc2", "upgrade"):
            pytest.fail("the lock of a live holder was taken")
    message = str(e.value)
    assert message.startswith(f"release 'sc2' is being rolled back by another llmctl (pid {proc.pid}, since ")
    assert message.endswith("); wait for it to finish")
    assert "\n" not in message
    assert (e.value.pid, e.value.verb) == (proc.pid, "rollback")
    assert RFC3339.fullmatch(e.value.started)

    with store.operation("other", "install"):  # another release is not blocked
        pass

    started = time.monotonic()
    with pytest.raises(ReleaseBusyError):
        with store.operation("sc2", "upgrade", wait=0.3):
            pass
    assert time.monotonic() - started >= 0.3
    assert proc.poll() is None


def test_wait_polls_until_the_holder_finishes(
    store: ReleaseStore, hold: Callable[..., subprocess.Popen[bytes]]
) -> None:
    proc = hold("sc2", "install", seconds=0.5)
    with store.operation("sc2", "upgrade", wait=30) as op:
        assert op.took_over is None  # released normally, not taken over
    assert proc.wait(timeout=10) == 0


def test_sigkilled_holder_is_taken_over_and_recovered(
    store: ReleaseStore, db: Path, hold: Callable[..., subprocess.Popen[bytes]]
) -> None:
    store.add(make_rev("sc2", 1, "deployed", driver="process"))
    proc = hold("sc2", "upgrade", mode="pending")
    assert store.get("sc2").status == "pending-upgrade"
    with pytest.raises(ReleaseBusyError, match=f"is being upgraded by another llmctl \\(pid {proc.pid},"):
        with store.operation("sc2", "upgrade"):
            pass

    os.kill(proc.pid, signal.SIGKILL)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead but not reaped: a zombie holds the pid
    with store.operation("sc2", "upgrade") as op:
        assert op.took_over is not None and f"pid {proc.pid} (upgrade since" in op.took_over
        notes = store.recover("sc2")
        assert notes == ["release 'sc2' revision 2: pending-upgrade was interrupted; marked failed"]
        assert store.recover("sc2") == []  # nothing left to recover
    proc.wait(timeout=10)

    interrupted = store.get("sc2", 2)
    assert interrupted.status == "failed"
    assert interrupted.description == f"interrupted: pending-upgrade did not finish (recovered by pid {os.getpid()})"
    current = store.deployed("sc2")
    assert current is not None and current.revision == 1
    assert lock_row(db, "sc2") is None


def test_holder_that_exited_without_unlocking_is_taken_over(
    store: ReleaseStore, db: Path, hold: Callable[..., subprocess.Popen[bytes]]
) -> None:
    proc = hold("sc2", "uninstall", mode="exit")
    assert proc.wait(timeout=10) == 0
    row = lock_row(db, "sc2")
    assert row is not None and row["pid"] == proc.pid  # left behind
    with store.operation("sc2", "uninstall") as op:
        assert op.took_over is not None and f"pid {proc.pid}" in op.took_over


def test_recover_marks_every_pending_status_failed(store: ReleaseStore) -> None:
    store.add(make_rev("sc2", 1, "superseded"))
    store.add(make_rev("sc2", 2, "pending-rollback"))
    store.add(make_rev("sc2", 3, "uninstalling"))
    with pytest.raises(RuntimeError, match="without holding the release's lock"):
        store.recover("sc2")
    with store.operation("sc2", "uninstall"):
        notes = store.recover("sc2")
    assert len(notes) == 2
    assert [(r.revision, r.status) for r in store.history("sc2")] == [(1, "superseded"), (2, "failed"), (3, "failed")]
    assert store.get("sc2", 3).description.startswith("interrupted: uninstalling did not finish (recovered by pid ")


@pytest.mark.parametrize("column", ["start_time", "boot_id"])
def test_reused_pid_or_reboot_means_dead(
    store: ReleaseStore, db: Path, hold: Callable[..., subprocess.Popen[bytes]], column: str
) -> None:
    if column == "boot_id" and not Path("/proc/sys/kernel/random/boot_id").exists():
        pytest.skip("no boot id on this system")
    proc = hold("sc2", "upgrade")
    row = lock_row(db, "sc2")
    assert row is not None and row[column] is not None
    # the recorded pid is alive, but the record says it was a process started at another time (or boot)
    edit_lock(db, "sc2", **{column: row[column] + 1 if column == "start_time" else "another-boot"})
    with store.operation("sc2", "upgrade") as op:
        assert op.took_over is not None and f"pid {proc.pid}" in op.took_over
    assert proc.poll() is None  # the process itself is left alone


def test_holder_on_another_host_is_assumed_alive(
    store: ReleaseStore, db: Path, hold: Callable[..., subprocess.Popen[bytes]]
) -> None:
    hold("sc2", "install")
    edit_lock(db, "sc2", hostname="build-07", pid=4_000_000)
    with pytest.raises(ReleaseBusyError, match=r"\(pid 4000000 on build-07, since "):
        with store.operation("sc2", "upgrade"):
            pass


def test_threads_racing_exactly_one_wins(store: ReleaseStore) -> None:
    n = 8
    barrier = threading.Barrier(n)
    done = threading.Event()
    results: list[str] = []
    guard = threading.Lock()

    def race() -> None:
        barrier.wait()
        try:
            with store.operation("sc2", "install"):
                with guard:
                    results.append("won")
                done.wait(30)
        except ReleaseBusyError:
            with guard:
                results.append("busy")

    threads = [threading.Thread(target=race) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(results) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    done.set()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == ["busy"] * (n - 1) + ["won"]


def test_processes_racing_exactly_one_wins(
    store: ReleaseStore, db: Path, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    n = 4
    go, done = tmp_path / "go", tmp_path / "done"
    ready = [tmp_path / f"ready-{i}" for i in range(n)]
    result = [tmp_path / f"result-{i}" for i in range(n)]
    for i in range(n):
        args = [str(db), "sc2", str(ready[i]), str(go), str(done), str(result[i])]
        processes.append(subprocess.Popen([sys.executable, "-c", RACER, *args], cwd=ROOT, stderr=subprocess.PIPE))
    for i in range(n):
        wait_for(ready[i], processes[i])
    go.touch()
    for i in range(n):
        wait_for(result[i], processes[i])
    done.touch()
    for proc in processes:
        assert proc.wait(timeout=30) == 0

    outcomes = {processes[i].pid: result[i].read_text() for i in range(n)}
    winners = [pid for pid, text in outcomes.items() if text == "won"]
    assert len(winners) == 1
    assert sorted(text for text in outcomes.values() if text != "won") == [f"busy {winners[0]}"] * (n - 1)
    assert lock_row(db, "sc2") is None
