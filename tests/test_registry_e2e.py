"""The registry verbs end to end through `llmctl`, against Debian's docker-registry on loopback with TLS
(a CA the test makes) and htpasswd auth: a platform team builds, signs and pushes; another machine
(another llmctl home that trusts only the team's public key) pulls, verifies and installs exactly
those bytes; tampering and untrusted signatures are refused; mirror to a directory and back keeps
every digest; models and charts travel as signed artifacts."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager import cli, images, keys
from manager.releases import ReleaseStore
from tests.registry_server import RegistryServer, TamperProxy
from tests.releasehome import demo_sets, demo_weights, llmctl, new_home

PASSWORD = "registry tests"
USER, SECRET = "platform", "s3cret-pass"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("registry"), tls=True, users={USER: SECRET}) as server:
        yield server


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer) -> Iterator[dict[str, object]]:
    """The platform team's home: a key, a built and signed demo image, logged in to the registry."""
    work = tmp_path_factory.mktemp("team")
    weights, digest = demo_weights(work)
    sets = demo_sets(weights, digest)
    home = new_home(work)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMCTL_HOME", str(home))
        mp.setenv("LLMCTL_KEY_PASSWORD", PASSWORD)
        keys.generate()
        assert cli.main(["build", "demo", *sets, "--no-load", "--no-progress"]) == 0
        mp.setattr("sys.stdin", io.StringIO(SECRET + "\n"))
        ca = str(registry.ca_file)
        assert cli.main(["registry", "login", registry.host, "-u", USER, "--password-stdin", "--ca-file", ca]) == 0
        yield {"home": home, "sets": sets, "weights": weights, "digest": digest}


def use(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_HOME", str(home))
    monkeypatch.setenv("LLMCTL_KEY_PASSWORD", PASSWORD)


@pytest.fixture
def site(team: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: RegistryServer) -> Path:
    """Another machine: trusts only the team's public key for the registry's repositories."""
    home = new_home(tmp_path / "site")
    (home / "config").mkdir()
    team_pub = Path(str(team["home"])) / "config" / "keys" / "cosign.pub"
    shutil.copy(team_pub, home / "config" / "team.pub")
    shutil.copy(Path(str(team["home"])) / "config" / "auth.json", home / "config" / "auth.json")
    (home / "config" / "policy.yaml").write_text(
        "apiVersion: llmctl.dev/v1\nkind: TrustPolicy\nrules:\n"
        f"  - repositories: ['{registry.host}/*']\n    keys: [./team.pub]\n    requireProvenance: true\n"
    )
    use(home, monkeypatch)
    return home


def tls(registry: RegistryServer) -> list[str]:
    return ["--ca-file", str(registry.ca_file)]


def push_demo(team: dict[str, object], registry: RegistryServer, monkeypatch: pytest.MonkeyPatch, repo: str) -> str:
    use(Path(str(team["home"])), monkeypatch)
    ref = f"{registry.host}/{repo}:1.0.0"
    assert cli.main(["push", "llmctl/demo:1.0.0", ref, *tls(registry)]) == 0
    return ref


def test_push_pull_verify_and_install_exactly_those_bytes(
    team: dict[str, object], registry: RegistryServer, site: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ref = push_demo(team, registry, monkeypatch, "llm/demo")
    built = images.resolve("llmctl/demo:1.0.0").digest
    out = capsys.readouterr().out
    assert f"{built}" in out and ".sig" in out and ".att" in out
    use(site, monkeypatch)
    code, out, err = llmctl(capsys, "pull", ref, *tls(registry))
    assert code == 0, err
    assert images.resolve(ref).digest == built  # the same digest on both machines
    # install runs the pulled image (no build here: the site has no weights and no key)
    code, out, err = llmctl(
        capsys, "install", "sc", "demo", *[str(s) for s in team["sets"]], "--set", f"image={ref}",
        "--driver", "process", *tls(registry),
    )  # fmt: skip
    assert code == 0, err
    rev = ReleaseStore().get("sc")
    assert rev.image == ref and rev.image_digest == built and rev.status == "deployed"
    events = [(e["event"], e["outcome"]) for e in json.loads(llmctl(capsys, "audit", "show", "-o", "json")[1])]
    assert ("pull", "ok") in events and ("policy", "ok") in events and ("install", "ok") in events
    assert llmctl(capsys, "uninstall", "sc")[0] == 0


def test_pull_signed_by_an_untrusted_key_is_refused_and_dropped(
    team: dict[str, object], registry: RegistryServer, site: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    other = site / "config" / "other.pub"
    keys.generate("other")
    shutil.copy(site / "config" / "keys" / "other.pub", other)
    policy = site / "config" / "policy.yaml"
    policy.write_text(policy.read_text().replace("./team.pub", "./other.pub"))
    ref = push_demo(team, registry, monkeypatch, "llm/untrusted")
    use(site, monkeypatch)
    code, _, err = llmctl(capsys, "pull", ref, *tls(registry))
    assert code == 1 and "none of its 1 signature(s) verifies with the trusted key(s)" in err
    with pytest.raises(Exception, match="no image"):
        images.resolve(ref)  # nothing unverified stays in the store


def test_tampered_registry_answers_are_refused(
    team: dict[str, object], registry: RegistryServer, site: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    plain = RegistryServer(tmp_path / "plain")  # the proxy speaks plain HTTP to a plain registry
    with plain, TamperProxy(plain.port) as proxy:
        use(Path(str(team["home"])), monkeypatch)
        ref = f"{proxy.host}/llm/demo:1.0.0"
        assert llmctl(capsys, "push", "llmctl/demo:1.0.0", ref, "--plain-http")[0] == 0
        use(site, monkeypatch)
        policy = site / "config" / "policy.yaml"
        policy.write_text(policy.read_text().replace(registry.host, proxy.host))
        proxy.tamper_blobs = True
        code, _, err = llmctl(capsys, "pull", ref, "--plain-http")
        assert code == 1 and "sha256:" in err
        proxy.tamper_blobs, proxy.tamper_manifests = False, True
        code, _, err = llmctl(capsys, "pull", ref, "--plain-http")
        assert code == 1 and "sha256:" in err
        assert not [
            r
            for r in json.loads(llmctl(capsys, "audit", "show", "-o", "json")[1])
            if r["outcome"] == "ok" and r["event"] == "pull"
        ]


def test_tls_with_an_unknown_ca_and_a_wrong_password_are_clear_errors(
    team: dict[str, object], registry: RegistryServer, site: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ref = f"{registry.host}/llm/demo:1.0.0"
    code, _, err = llmctl(capsys, "pull", ref)  # no --ca-file: the test CA is unknown
    assert code == 1 and "--ca-file" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("wrong\n"))
    code, _, err = llmctl(capsys, "registry", "login", registry.host, "-u", USER, "--password-stdin", *tls(registry))
    assert code == 1 and registry.host in err and "wrong" not in err


def test_mirror_to_a_directory_and_back_keeps_every_digest(
    team: dict[str, object], registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ref = push_demo(team, registry, monkeypatch, "llm/mirror-src")
    built = images.resolve("llmctl/demo:1.0.0").digest
    usb = tmp_path / "usb"
    code, out, err = llmctl(capsys, "mirror", ref, f"oci-layout:{usb}:llm/demo:1.0.0", *tls(registry))
    assert code == 0, err
    index = json.loads((usb / "index.json").read_text())
    names = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert names["llm/demo:1.0.0"] == built
    assert any(n.endswith(".sig") for n in names) and any(n.endswith(".att") for n in names)
    back = f"{registry.host}/llm/mirror-back:1.0.0"
    code, out, err = llmctl(capsys, "mirror", f"oci-layout:{usb}:llm/demo:1.0.0", back, *tls(registry))
    assert code == 0, err
    assert built in out and ".sig" in out


def test_model_and_chart_artifacts_travel_signed(
    team: dict[str, object], registry: RegistryServer, site: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    use(Path(str(team["home"])), monkeypatch)
    model_ref = f"{registry.host}/models/demo:q8_0"
    code, _, err = llmctl(
        capsys, "model", "push", str(team["weights"]), model_ref, "--name", "demo", "--version", "q8_0", *tls(registry)
    )
    assert code == 0, err
    charts_dir = Path(__file__).resolve().parent.parent / "charts"
    code, _, err = llmctl(
        capsys, "chart", "push", str(charts_dir / "demo"), f"oci://{registry.host}/charts", *tls(registry)
    )
    assert code == 0, err

    use(site, monkeypatch)
    policy = site / "config" / "policy.yaml"
    policy.write_text(policy.read_text().replace("    requireProvenance: true\n", ""))
    code, out, err = llmctl(capsys, "model", "pull", model_ref, *tls(registry))
    assert code == 0, err
    path = Path(out.strip())
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == team["digest"]
    code, out, err = llmctl(
        capsys, "chart", "pull", f"oci://{registry.host}/charts/demo", "--version", "1.0.0", *tls(registry)
    )
    assert code == 0, err and out.strip().endswith(".tgz")
    code, out, err = llmctl(
        capsys, "template", f"oci://{registry.host}/charts/demo", "--version", "1.0.0",
        "--set", f"weights.path={path}", "--set", f"weights.sha256={team['digest']}", *tls(registry),
    )  # fmt: skip
    assert code == 0, err
    assert "kind: Model" in out
    # a stack may name the oci:// chart too: diff pulls it with the registry flags to render it
    stack_file = site / "stack.yaml"
    stack_file.write_text(
        "apiVersion: llmctl.dev/v1\nkind: Stack\nmetadata: {name: s}\nreleases:\n"
        f"  - name: sc\n    chart: oci://{registry.host}/charts/demo\n    version: 1.0.0\n"
        f"    values: {{weights: {{path: '{path}', sha256: '{team['digest']}'}}}}\n"
    )
    code, out, err = llmctl(capsys, "diff", "-f", str(stack_file), *tls(registry))
    assert code == 2 and "+ install sc (demo 1.0.0)" in out, err


def test_an_image_whose_signature_was_deleted_is_refused_by_the_policy(
    team: dict[str, object], registry: RegistryServer, site: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from manager import transfer
    from registry.attachments import SIG, attachment_tag

    ref = push_demo(team, registry, monkeypatch, "llm/unsigned")
    digest = images.resolve("llmctl/demo:1.0.0").digest
    c = transfer.client(registry.host, transfer.Connection(ca_file=registry.ca_file))
    sig_digest = c.head_manifest("llm/unsigned", attachment_tag(digest, SIG))
    assert sig_digest is not None
    c.delete_manifest("llm/unsigned", sig_digest)  # someone removed the signature in the registry
    use(site, monkeypatch)
    code, _, err = llmctl(capsys, "pull", ref, *tls(registry))
    assert code == 1 and "has no signature" in err


def test_install_upgrade_rollback_on_kubernetes_runs_the_verified_image_by_digest(
    team: dict[str, object], registry: RegistryServer, site: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    """The release verbs with --driver kubernetes against a recorded API exchange (tests/k8s_replay.py):
    llmctl pulls and verifies the image, then the cluster runs exactly that digest."""
    import kubernetes_validate

    from manager.drivers import kubernetes as kdriver
    from tests.k8s_replay import ReplayServer, load_exchange

    ref = push_demo(team, registry, monkeypatch, "llm/demo-k8s")
    built = images.resolve("llmctl/demo:1.0.0").digest
    use(site, monkeypatch)
    monkeypatch.setattr(kdriver, "POLL", 0.01)
    sets = [str(s) for s in team["sets"]]
    with ReplayServer(tmp_path / "k8s", load_exchange("cli-install-upgrade-rollback-uninstall")) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig()))
        code, out, err = llmctl(capsys, "install", "sc", "demo", *sets, "--set", f"image={ref}",
                                "--driver", "kubernetes", *tls(registry))  # fmt: skip
        assert code == 0, err
        rev = ReleaseStore().get("sc")
        assert (rev.driver, rev.image_digest, rev.endpoint) == (
            "kubernetes",
            built,
            "http://sc.models.svc.cluster.local:8080",
        )
        code, _, err = llmctl(capsys, "upgrade", "sc", "demo", "--reuse-values", "--set", "server.parallel=4",
                              *tls(registry))  # fmt: skip
        assert code == 0, err
        code, _, err = llmctl(capsys, "rollback", "sc", "1", *tls(registry))
        assert code == 0, err
        code, out, err = llmctl(capsys, "status", "sc", "-o", "json")
        assert code == 0, err
        status = json.loads(out)
        assert status["revision"] == 3 and status["instance"]["health"] == "healthy"
        assert llmctl(capsys, "uninstall", "sc")[0] == 0
        api.check()
    sent = [r.body for r in api.requests if r.method in ("POST", "PATCH") and r.path.endswith(("/deployments", "/sc"))]
    deployments = [b for b in sent if isinstance(b, dict) and b.get("kind") == "Deployment"]
    assert len(deployments) == 3
    for body in deployments:
        pod = body["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == f"{registry.host}/llm/demo-k8s@{built}"
        kubernetes_validate.validate(
            {**body, "metadata": {"name": "sc"}}, kubernetes_validate.latest_version(), strict=True
        )
    assert [d["spec"]["template"]["metadata"]["labels"]["llmctl.dev/revision"] for d in deployments] == ["1", "2", "3"]
    upgraded = deployments[1]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert upgraded[upgraded.index("--parallel") + 1] == "4"
    assert ReleaseStore().list(all=True) == []  # uninstalled without --keep-history
    events = [(e["event"], e["outcome"]) for e in json.loads(llmctl(capsys, "audit", "show", "-o", "json")[1])]
    assert ("install", "ok") in events and ("rollback", "ok") in events and ("uninstall", "ok") in events


def test_kubernetes_needs_an_image_from_a_registry_before_anything_is_built(
    team: dict[str, object], site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    from tests.k8s_replay import ReplayServer, load_exchange

    with ReplayServer(tmp_path / "k8s", load_exchange("empty")) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig()))
        sets = [str(s) for s in team["sets"]]
        code, _, err = llmctl(capsys, "install", "sc", "demo", *sets, "--driver", "kubernetes")
        assert code == 1 and "the kubernetes driver runs images the cluster pulls from a registry" in err
        assert "--set image=REGISTRY/REPO:TAG" in err
        api.check()  # the cluster was not asked anything
    assert ReleaseStore().list(all=True) == []


def test_a_stack_scales_a_kubernetes_release_and_diff_shows_the_replica_count(
    team: dict[str, object], registry: RegistryServer, site: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:  # fmt: skip
    import yaml

    from manager.drivers import kubernetes as kdriver
    from tests.k8s_replay import ReplayServer, load_exchange

    ref = push_demo(team, registry, monkeypatch, "llm/demo-stack")
    pinned = f"{registry.host}/llm/demo-stack@{images.resolve('llmctl/demo:1.0.0').digest}"
    use(site, monkeypatch)
    monkeypatch.setattr(kdriver, "POLL", 0.01)
    weights = {"path": str(team["weights"]), "sha256": str(team["digest"])}
    release = {"name": "sc", "chart": "demo", "values": {"weights": weights, "image": ref}, "driver": "kubernetes"}
    stack_file = tmp_path / "stack.yaml"

    def write(replicas: int) -> None:
        doc = {"apiVersion": "llmctl.dev/v1", "kind": "Stack", "metadata": {"name": "cluster"}}
        stack_file.write_text(yaml.safe_dump({**doc, "releases": [{**release, "replicas": replicas}]}))

    exchange = load_exchange("stack-scale", weights=str(team["digest"]).removeprefix("sha256:"), pinned=pinned)
    with ReplayServer(tmp_path / "k8s", exchange) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig()))
        write(2)
        code, out, err = llmctl(capsys, "apply", "-f", str(stack_file), *tls(registry))
        assert code == 0, err
        assert "+ install sc" in out
        code, out, err = llmctl(capsys, "diff", "-f", str(stack_file))
        assert code == 0, out + err
        code, out, err = llmctl(capsys, "drift", "sc")
        assert code == 0, out + err
        code, out, err = llmctl(capsys, "drift", "sc", "-o", "json")
        assert code == 2 and [d["kind"] for d in json.loads(out)] == ["image"], out + err
        write(3)
        code, out, err = llmctl(capsys, "diff", "-f", str(stack_file))
        assert code == 2 and "~ upgrade sc: replicas 2 -> 3" in out, out + err
        code, out, err = llmctl(capsys, "apply", "-f", str(stack_file), *tls(registry))
        assert code == 0, err
        assert ReleaseStore().deployed("sc").revision == 2  # type: ignore[union-attr]
        assert llmctl(capsys, "uninstall", "sc")[0] == 0
        api.check()
    deployment_bodies = [
        r.body for r in api.requests if r.path.endswith(("/deployments", "/deployments/sc")) and r.body
    ]
    assert [b["spec"]["replicas"] for b in deployment_bodies] == [2, 3]
