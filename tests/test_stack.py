"""Stacks end to end: `llmctl diff | apply | drift -f stack.yaml` with real releases of the demo chart
(generated weights, signed image) on the process driver. No mocks.

The module builds the demo image once (`prepared`); each test copies that home, and uninstalls
whatever it left running.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from manager import stack
from manager.drivers.procfs import read_json
from manager.releases import ReleaseStore
from tests.polling import until
from tests.releasehome import demo_sets, demo_weights, fails, home_copy, llmctl, prepared_home

PASSWORD = "stack tests"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A home with a key and the demo image already built, and the values that point the demo chart
    at its generated weights."""
    work = tmp_path_factory.mktemp("stacks")
    weights, digest = demo_weights(work)
    with prepared_home(work, PASSWORD, demo_sets(weights, digest)) as home:
        yield home, {"weights": {"path": str(weights), "sha256": digest}}


@pytest.fixture
def home(prepared: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from home_copy(prepared[0], tmp_path, monkeypatch, PASSWORD)


@pytest.fixture
def repo(prepared: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GitOps repository: values/common.yaml points the demo chart at the weights; tests write
    stack.yaml. The working directory is elsewhere: paths are relative to the stack file."""
    root = tmp_path / "repo"
    (root / "values").mkdir(parents=True)
    (root / "values" / "common.yaml").write_text(yaml.safe_dump(prepared[1]))
    monkeypatch.chdir(tmp_path)
    return root


def write_stack(repo: Path, releases: list[dict[str, Any]], name: str = "team") -> Path:
    doc = {"apiVersion": "llmctl.dev/v1", "kind": "Stack", "metadata": {"name": name}, "releases": releases}
    path = repo / "stack.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def release(name: str, parallel: int = 2) -> dict[str, Any]:
    return {
        "name": name,
        "chart": "demo",
        "version": "1.0.0",
        "valuesFiles": ["values/common.yaml"],
        "values": {"server": {"parallel": parallel}},
        "driver": "process",
    }


def expect(capsys: pytest.CaptureFixture[str], code: int, *args: str) -> str:
    got, out, err = llmctl(capsys, *args)
    assert got == code, f"exit {got}, not {code}\n{out}\n{err}"
    return out


def revisions(name: str) -> list[tuple[int, str]]:
    return [(r.revision, r.status) for r in ReleaseStore().history(name)]


def healthy(endpoint: str | None) -> bool:
    return httpx.get(f"{endpoint}/health", timeout=10).status_code == 200


def test_apply_installs_then_is_idempotent_and_upgrades_only_what_changed(
    home: Path, repo: Path, prepared: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    file = str(write_stack(repo, [release("stk-a"), release("stk-b")]))
    out = expect(capsys, 2, "diff", "-f", file)
    assert "+ install stk-a (demo 1.0.0)" in out and "+ install stk-b (demo 1.0.0)" in out
    assert "Plan: 2 to install" in out
    assert ReleaseStore().list(all=True) == []  # diff changed nothing
    assert "+ install stk-a" in expect(capsys, 0, "apply", "-f", file, "--dry-run")
    assert ReleaseStore().list(all=True) == []

    out = expect(capsys, 0, "apply", "-f", file)
    assert "+ install stk-a (demo 1.0.0): done, revision 1 at http://127.0.0.1:" in out
    a, b = ReleaseStore().get("stk-a"), ReleaseStore().get("stk-b")
    assert (a.status, b.status) == ("deployed", "deployed") and healthy(a.endpoint) and healthy(b.endpoint)
    assert a.values == {**prepared[1], "server": {"parallel": 2}}  # valuesFiles, then the inline values
    owners = json.loads(stack.ownership_path("team").read_text())
    assert sorted(owners["releases"]) == ["stk-a", "stk-b"] and owners["file"] == str(repo / "stack.yaml")

    # the same file again: nothing to do, nothing done
    assert "No changes: 2 release(s) match" in expect(capsys, 0, "diff", "-f", file)
    assert "Nothing to do" in expect(capsys, 0, "apply", "-f", file)
    assert revisions("stk-a") == [(1, "deployed")] and revisions("stk-b") == [(1, "deployed")]

    # one value changes: diff shows its path, apply upgrades that release only
    write_stack(repo, [release("stk-a"), release("stk-b", parallel=3)])
    out = expect(capsys, 2, "diff", "-f", file)
    assert "~ upgrade stk-b: server.parallel 2 -> 3" in out and "stk-a" not in out
    plan = json.loads(expect(capsys, 2, "diff", "-f", file, "-o", "json"))
    assert plan["changed"] and plan["summary"]["upgrade"] == 1 and plan["summary"]["none"] == 1
    [upgrade] = [c for c in plan["changes"] if c["action"] == "upgrade"]
    assert upgrade["differences"] == [{"kind": "values", "path": "server.parallel", "old": 2, "new": 3}]
    assert upgrade["source"].endswith("stack.yaml:15")

    out = expect(capsys, 0, "apply", "-f", file)
    assert "~ upgrade stk-b: server.parallel 2 -> 3: done, revision 2" in out
    assert revisions("stk-a") == [(1, "deployed")]
    assert revisions("stk-b") == [(1, "superseded"), (2, "deployed")]
    assert ReleaseStore().get("stk-b").values["server"] == {"parallel": 3}
    assert expect(capsys, 0, "drift").startswith("no drift")
    assert "No changes" in expect(capsys, 0, "diff", "-f", file)
    audit = json.loads(expect(capsys, 0, "audit", "show", "-o", "json"))
    applied = [e for e in audit if e["event"] == "apply" and e["subject"] == "team"]
    assert [e["details"]["changes"] for e in applied] == [["install stk-a", "install stk-b"], ["upgrade stk-b"]]


def test_prune_removes_only_releases_the_stack_applied(
    home: Path, repo: Path, prepared: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    weights = prepared[1]["weights"]
    sets = ["--set", f"weights.path={weights['path']}", "--set", f"weights.sha256={weights['sha256']}"]
    expect(capsys, 0, "install", "by-hand", "demo", *sets, "--driver", "process")
    file = str(write_stack(repo, [release("stk-a"), release("stk-b")]))
    expect(capsys, 0, "apply", "-f", file, "--prune")
    assert revisions("by-hand") == [(1, "deployed")]  # not in the file, never applied by the stack: left alone

    write_stack(repo, [release("stk-a")])
    out = expect(capsys, 0, "diff", "-f", file)  # without --prune nothing is removed
    assert "uninstall" not in out.replace("--prune uninstalls", "")
    assert "note: stk-b was applied by stack team but is no longer in" in out
    out = expect(capsys, 2, "diff", "-f", file, "--prune")
    assert "- uninstall stk-b" in out and "by-hand" not in out
    out = expect(capsys, 0, "apply", "-f", file, "--prune")
    assert "- uninstall stk-b: done" in out
    assert sorted(r.name for r in ReleaseStore().list(all=True)) == ["by-hand", "stk-a"]
    assert sorted(json.loads(stack.ownership_path("team").read_text())["releases"]) == ["stk-a"]

    # a release the stack applied, then uninstalled and installed again by hand, is no longer the stack's
    write_stack(repo, [release("stk-a"), release("stk-c")])
    expect(capsys, 0, "apply", "-f", file)
    expect(capsys, 0, "uninstall", "stk-c")
    expect(capsys, 0, "install", "stk-c", "demo", *sets, "--driver", "process")
    write_stack(repo, [release("stk-a")])
    out = expect(capsys, 0, "diff", "-f", file, "--prune")
    assert "stk-c" not in out
    expect(capsys, 0, "apply", "-f", file, "--prune")
    assert ReleaseStore().get("stk-c").status == "deployed"

    # an empty stack with --prune removes what it applied, and only that
    write_stack(repo, [])
    assert "- uninstall stk-a" in expect(capsys, 2, "diff", "-f", file, "--prune")
    expect(capsys, 0, "apply", "-f", file, "--prune")
    assert sorted(r.name for r in ReleaseStore().list(all=True)) == ["by-hand", "stk-c"]


def test_stack_file_errors_name_the_file_line_and_field(
    home: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = repo / "stack.yaml"
    head = "apiVersion: llmctl.dev/v1\nkind: Stack\nmetadata: {name: team}\nreleases:\n"
    cases = {
        "  - name: a\n    chart: demo\n    driver: podman\n": ("stack.yaml:7:", "releases[0].driver", "podman"),
        "  - name: a\n    chart: demo\n  - name: a\n    chart: demo\n": ("stack.yaml:7:", "releases[1].name", "twice"),
        "  - name: a\n    chart: demo\n    valuez: {}\n": ("stack.yaml:7:", "releases[0]", "valuez"),
        "  - name: A_b\n    chart: demo\n": ("stack.yaml:5:", "releases[0].name", "A_b"),
        "  - name: a\n    chart: demo\n    version: 1.0\n": ("stack.yaml:7:", "releases[0].version", "string"),
        "  - name: a\n    chart: demo\n    valuesFiles: [values/nope.yaml]\n": (
            "stack.yaml:7:",
            "releases[0].valuesFiles[0]",
            "no such file",
        ),
        "  - name: a\n    chart: ./charts/nope\n": ("stack.yaml:6:", "releases[0].chart", "no such chart"),
        "  - name: a\n    chart: demo\n    replicas: 3\n": ("stack.yaml:7:", "releases[0].replicas", "driver: swarm"),
        "  - name: a\n    chart: demo\n    driver: kubernetes\n    replicas: 0\n": (
            "stack.yaml:8:",
            "releases[0].replicas",
            "minimum",
        ),
    }
    for body, (where, field, detail) in cases.items():
        path.write_text(head + body)
        err = fails(capsys, "diff", "-f", str(path))
        assert where in err and f"stack field {field}" in err and detail in err, err
    path.write_text(head.replace("kind: Stack", "kind: Model") + "  - {name: a, chart: demo}\n")
    assert "stack.yaml:2: stack field kind" in fails(capsys, "apply", "-f", str(path))

    # values the chart refuses: the release and its line, then the chart's own message with the field
    write_stack(repo, [release("stk-a"), {**release("stk-b"), "values": {"server": {"parallel": "many"}}}])
    err = fails(capsys, "apply", "-f", str(path))
    assert "stack.yaml:15: release 'stk-b': demo: values field server.parallel" in err
    assert ReleaseStore().list(all=True) == []  # checked before anything changed


def _kill_supervisor(home: Path, name: str, revision: int) -> None:
    state = read_json(home / "data" / "instances" / f"{name}-{revision}.json")
    assert state is not None
    os.killpg(state["supervisor"]["pid"], signal.SIGKILL)  # the supervisor and the server
    if not until(lambda: any(d.kind == "exited" for d in stack.drift([name])), 30, every=0.1):
        pytest.fail(f"{name} revision {revision} never showed as exited")


def test_drift_detects_an_exited_instance_and_apply_repairs_it(
    home: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = str(write_stack(repo, [release("stk-a"), release("stk-b")]))
    expect(capsys, 0, "apply", "-f", file)
    assert expect(capsys, 0, "drift").startswith("no drift")

    _kill_supervisor(home, "stk-a", 1)
    out = expect(capsys, 2, "drift")
    assert "stk-a" in out and "exited" in out and "stk-b" not in out
    [found] = json.loads(expect(capsys, 2, "drift", "stk-a", "-o", "json"))
    assert (found["release"], found["revision"], found["kind"]) == ("stk-a", 1, "exited")
    assert expect(capsys, 0, "drift", "stk-b").startswith("no drift")
    assert "not found" in fails(capsys, "drift", "nope")

    out = expect(capsys, 2, "diff", "-f", file)
    assert "! repair stk-a: instance exited" in out and "Plan: 0 to install, 0 to upgrade, 1 to repair" in out
    out = expect(capsys, 0, "apply", "-f", file)
    assert "! repair stk-a: instance exited: done, revision 2" in out
    repaired = ReleaseStore().get("stk-a")
    assert revisions("stk-a") == [(1, "superseded"), (2, "deployed")] and healthy(repaired.endpoint)
    assert repaired.values == ReleaseStore().get("stk-a", 1).values  # the same chart and values
    assert revisions("stk-b") == [(1, "deployed")]
    assert not (home / "data" / "instances" / "stk-a-1.json").exists()  # the dead instance is gone
    assert expect(capsys, 0, "drift").startswith("no drift")
    assert "No changes" in expect(capsys, 0, "diff", "-f", file)

    # an instance left beside the deployed one (say, by a killed llmctl) is an orphan: removed, no new revision
    state = read_json(home / "data" / "instances" / "stk-b-1.json")
    assert state is not None
    orphan = {**state, "revision": 7, "supervisor": None, "child": None}
    (home / "data" / "instances" / "stk-b-7.json").write_text(json.dumps(orphan))
    assert "orphan instance of revision 7" in expect(capsys, 2, "drift", "stk-b")
    assert "! repair stk-b: orphan instance of revision 7" in expect(capsys, 0, "apply", "-f", file)
    assert revisions("stk-b") == [(1, "deployed")] and not (home / "data" / "instances" / "stk-b-7.json").exists()
    assert expect(capsys, 0, "drift").startswith("no drift")


def test_a_failing_release_stops_apply_and_earlier_releases_stay_deployed(
    home: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {**release("stk-bad"), "values": {"weights": {"sha256": "sha256:" + "0" * 64}}}
    file = str(write_stack(repo, [release("stk-a"), bad, release("stk-c")]))
    code, out, err = llmctl(capsys, "apply", "-f", file)
    assert code == 1
    assert "+ install stk-a (demo 1.0.0): done, revision 1" in out
    last = err.strip().splitlines()[-1]
    assert "stack 'team': install of release 'stk-bad'" in last and "stack.yaml:15" in last
    assert "sha256:" + "0" * 64 in last
    assert "applied before it: + install stk-a (demo 1.0.0)" in last and "not attempted: stk-c" in last
    assert revisions("stk-a") == [(1, "deployed")] and healthy(ReleaseStore().get("stk-a").endpoint)
    assert revisions("stk-bad") == [(1, "failed")]
    assert [r.name for r in ReleaseStore().list(all=True)] == ["stk-a", "stk-bad"]  # stk-c was not attempted

    # fixed in the file: the failed release is installed, stk-c too, stk-a is left as it is
    write_stack(repo, [release("stk-a"), release("stk-bad"), release("stk-c")])
    out = expect(capsys, 2, "diff", "-f", file)
    assert "+ install stk-bad" in out and "+ install stk-c" in out and "stk-a" not in out
    expect(capsys, 0, "apply", "-f", file)
    assert revisions("stk-bad") == [(1, "failed"), (2, "deployed")] and revisions("stk-a") == [(1, "deployed")]
    # a failed release the stack tried is the stack's: --prune cleans it up when it leaves the file
    write_stack(repo, [release("stk-a")])
    assert "- uninstall stk-bad" in expect(capsys, 2, "diff", "-f", file, "--prune")
