"""Releases end to end: `llmctl install | upgrade | rollback | uninstall | list | status | history`
with real charts, real signed images, the real process driver and the real Docker engine.

Each test has its own LLMCTL_HOME with a signing key; the first install in a module builds the demo
image (reused afterwards: same build inputs, same image).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from manager.releases import ReleaseStore
from tests.netutil import free_port
from tests.releasehome import demo_sets, demo_weights, fails, home_copy, llmctl, ok, prepared_home

PASSWORD = "release tests"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """A home with a key and the demo image already built, and the demo chart's --set flags."""
    work = tmp_path_factory.mktemp("releases")
    sets = demo_sets(*demo_weights(work))
    with prepared_home(work, PASSWORD, sets) as home:
        yield home, sets


@pytest.fixture
def home(prepared: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from home_copy(prepared[0], tmp_path, monkeypatch, PASSWORD)


@pytest.fixture
def demo(prepared: tuple[Path, list[str]]) -> list[str]:
    return prepared[1]


def complete(endpoint: str) -> dict[str, object]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{endpoint}/v1", api_key="unused")
    r = client.completions.create(model="demo", prompt="def add(a, b):\n    return ", suffix="\n", max_tokens=4)
    return {"text": r.choices[0].text, "tokens": r.usage.completion_tokens if r.usage else 0}


def test_install_upgrade_rollback_uninstall_with_the_process_driver(
    home: Path, demo: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = ok(capsys, "install", "sc", "demo", *demo, "--driver", "process")
    assert "STATUS: deployed" in out and "REVISION: 1" in out
    first = ReleaseStore().get("sc")
    assert first.endpoint and complete(first.endpoint)["tokens"]
    props = httpx.get(f"{first.endpoint}/props", timeout=10).json()

    ok(capsys, "upgrade", "sc", "demo", "--reuse-values", "--set", "server.parallel=3")
    second = ReleaseStore().get("sc")
    assert second.revision == 2 and second.status == "deployed" and second.endpoint != first.endpoint
    assert httpx.get(f"{second.endpoint}/props", timeout=10).json() != props
    assert ReleaseStore().get("sc", 1).status == "superseded"
    with pytest.raises(httpx.HTTPError):  # the old instance was retired
        httpx.get(f"{first.endpoint}/health", timeout=2)
    assert json.loads(ok(capsys, "get", "values", "sc", "-o", "json"))["server"] == {"parallel": 3}

    ok(capsys, "rollback", "sc")
    third = ReleaseStore().get("sc")
    assert third.revision == 3 and third.description == "Rollback to 1" and complete(str(third.endpoint))["tokens"]
    history = json.loads(ok(capsys, "history", "sc", "-o", "json"))
    assert [h["status"] for h in history] == ["superseded", "superseded", "deployed"]
    status = json.loads(ok(capsys, "status", "sc", "-o", "json"))
    assert status["instance"]["health"] == "healthy" and status["instance"]["revision"] == 3
    assert [i["release"] for i in json.loads(ok(capsys, "ps", "-o", "json", "--driver", "process"))] == ["sc"]

    assert 'release "sc" uninstalled' in ok(capsys, "uninstall", "sc", "--keep-history")
    assert json.loads(ok(capsys, "list", "-o", "json")) == []
    assert [r["status"] for r in json.loads(ok(capsys, "list", "-a", "-o", "json"))] == ["uninstalled"]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{third.endpoint}/health", timeout=2)

    # every step is in the audit log, chained; an edited entry is detected
    entries = [
        e for e in json.loads(ok(capsys, "audit", "show", "-o", "json")) if e["subject"] in ("sc", "llmctl/demo:1.0.0")
    ]
    events = [(e["event"], e["outcome"]) for e in entries]
    for expected in ("install", "upgrade", "rollback", "uninstall", "start", "policy"):
        assert (expected, "ok") in events, events
    assert "chain intact" in ok(capsys, "audit", "verify")
    log = home / "data" / "audit.log"
    log.write_text(log.read_text().replace('"event":"upgrade"', '"event":"install"', 1))
    code, _, err = llmctl(capsys, "audit", "verify")
    assert code == 1 and "audit.log" in err


def test_atomic_upgrade_that_never_gets_healthy_rolls_back_and_keeps_serving(
    home: Path, demo: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "install", "at", "demo", *demo, "--driver", "process")
    first = ReleaseStore().get("at")
    err = fails(capsys, "upgrade", "at", "demo", "--reuse-values", "--timeout", "0.01", "--atomic")
    assert "did not become healthy within 0 s" in err
    revs = ReleaseStore().history("at")
    assert [(r.revision, r.status) for r in revs] == [(1, "superseded"), (2, "failed"), (3, "deployed")]
    assert "Rollback to 1" in revs[-1].description and revs[-1].endpoint == first.endpoint
    assert complete(str(first.endpoint))["tokens"]  # it never stopped serving


def test_failed_upgrade_without_atomic_leaves_the_old_revision_deployed(
    home: Path, demo: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "install", "na", "demo", *demo, "--driver", "process")
    err = fails(capsys, "upgrade", "na", "demo", "--reuse-values", "--set", "weights.sha256=sha256:" + "0" * 64)
    assert "sha256:" + "0" * 64 in err
    assert [r.status for r in ReleaseStore().history("na")] == ["deployed", "failed"]
    assert ReleaseStore().deployed("na").revision == 1  # type: ignore[union-attr]


def test_kill_9_during_an_upgrade_is_recovered_by_the_next_command(
    home: Path, demo: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    ok(capsys, "install", "k9", "demo", *demo, "--driver", "process")
    env = {**os.environ}
    upgrade = subprocess.Popen(
        [sys.executable, "-m", "manager", "upgrade", "k9", "demo", "--reuse-values", "--set", "server.parallel=4"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    store = ReleaseStore()
    while time.monotonic() < deadline:  # kill it once revision 2 is recorded and its instance spawned
        revs = store.history("k9")
        if len(revs) == 2 and (home / "data" / "instances" / "k9-2.json").exists():
            break
        time.sleep(0.05)
    else:
        upgrade.kill()
        pytest.fail(f"the upgrade never reached its instance: {upgrade.communicate()[1]}")
    upgrade.send_signal(signal.SIGKILL)
    upgrade.wait()
    assert store.get("k9", 2).status == "pending-upgrade"  # what a crash leaves behind

    code, out, err = llmctl(capsys, "upgrade", "k9", "demo", "--reuse-values", "--set", "server.parallel=4")
    assert code == 0, err
    assert "recovered: release 'k9' revision 2: pending-upgrade was interrupted" in err
    assert [r.status for r in store.history("k9")] == ["superseded", "failed", "deployed"]
    instances = json.loads(ok(capsys, "ps", "-o", "json", "--driver", "process"))
    assert [(i["release"], i["revision"]) for i in instances] == [("k9", 3)]  # the orphan is gone


def test_two_concurrent_installs_of_one_name_one_wins(home: Path, demo: list[str]) -> None:
    cmd = [sys.executable, "-m", "manager", "install", "race", "demo", *demo, "--driver", "process"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "being installed by another llmctl" in loser or "already exists" in loser
    assert [r.status for r in ReleaseStore().history("race")] == ["deployed"]


def test_bad_values_and_charts_are_one_line_errors_with_paths(
    home: Path, demo: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails(capsys, "install", "bad", "demo", *demo, "--set", "server.parallel=many")
    assert "server.parallel" in err
    err = fails(capsys, "install", "bad", "demo", *demo, "--set", "network.nope=1")
    assert "network" in err and "nope" in err
    err = fails(capsys, "install", "bad", "demo")
    assert "weights.path" in err
    broken = tmp_path / "broken"
    shutil.copytree(Path(__file__).parent.parent / "charts" / "demo", broken)
    (broken / "Chart.yaml").write_text((broken / "Chart.yaml").read_text().replace("version: 1.0.0", "version: one"))
    err = fails(capsys, "install", "bad", str(broken), *demo)
    assert "Chart.yaml:3" in err and "version" in err
    assert ReleaseStore().list(all=True) == []  # nothing was recorded


def test_a_port_in_use_fails_the_install_cleanly(
    home: Path, demo: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        err = fails(capsys, "install", "busy", "demo", *demo, "--driver", "process", "--set", f"network.port={port}")
    assert str(port) in err
    assert [r.status for r in ReleaseStore().history("busy")] == ["failed"]
    ok(capsys, "install", "busy", "demo", *demo, "--driver", "process")  # a failed name can be installed again


def test_unreachable_engine_is_a_clear_error_and_the_process_driver_still_works(
    home: Path, demo: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    err = fails(capsys, "install", "nodocker", "demo", *demo, "--driver", "docker")
    assert "Docker engine is not reachable" in err and "--driver process" in err
    ok(capsys, "install", "nodocker", "demo", *demo)  # no engine: the process driver is the default
    assert ReleaseStore().get("nodocker").driver == "process"


def test_install_upgrade_uninstall_on_the_docker_engine(
    home: Path, demo: list[str], capsys: pytest.CaptureFixture[str], docker_client: object
) -> None:
    ok(capsys, "install", "dk", "demo", *demo, "--driver", "docker")
    first = ReleaseStore().get("dk")
    assert first.driver == "docker" and complete(str(first.endpoint))["tokens"]
    inspect = subprocess.run(
        [
            "docker",
            "inspect",
            "-f",
            '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}} {{index .Config.Labels "dev.llmctl.release"}}',
            str(first.instance_id),
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert inspect == ["true", "65532:65532", "dk"]
    ok(capsys, "upgrade", "dk", "demo", "--reuse-values", "--set", "server.parallel=3")
    second = ReleaseStore().get("dk")
    assert second.status == "deployed" and complete(str(second.endpoint))["tokens"]
    gone = subprocess.run(["docker", "inspect", str(first.instance_id)], capture_output=True)
    assert gone.returncode != 0  # the old container was removed
    ok(capsys, "uninstall", "dk")
    assert subprocess.run(["docker", "inspect", str(second.instance_id)], capture_output=True).returncode != 0
    assert ReleaseStore().list(all=True) == []


def test_build_from_a_chart_gives_the_image_install_verified(
    home: Path, demo: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from manager import images

    before = images.resolve("llmctl/demo:1.0.0").digest  # built by the first install of this module
    out = ok(capsys, "build", "demo", *demo, "--no-load", "--no-progress")
    assert f"digest: {before}" in out  # the chart, rendered the same way, builds the same bytes
    dockerfile = ok(capsys, "build", "starcoder2-7b-q4", "--dockerfile")
    assert "python -m runtime.requantize" in dockerfile and "72a8a59486cdcc85" in dockerfile
