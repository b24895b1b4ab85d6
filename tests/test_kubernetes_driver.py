"""The kubernetes driver against recorded API exchanges (tests/k8s_replay.py): the real `kubernetes`
client, over HTTPS with a bearer token, through a kubeconfig; every request must be the next one in
the exchange, and every object the driver sends must be valid for the Kubernetes schemas."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from manager.drivers import DriverError, DriverUnavailableError, InstanceSpec, get_driver
from manager.drivers import kubernetes as kdriver
from tests.k8s_replay import ReplayServer, load_exchange
from tests.netutil import free_port

IMAGE_HEX, WEIGHTS_HEX = "a" * 64, "b" * 64
API_KEY = "k3y-s3cret-value"
K8S_VERSION = kubernetes_validate.latest_version()

SPEC = InstanceSpec(
    release="sc2",
    revision=1,
    image="registry.internal:5000/llm/demo:1.0.0",
    image_id="sha256:" + "c" * 64,
    weights=None,
    weights_in_image="/models/demo.gguf",
    weights_sha256="sha256:" + WEIGHTS_HEX,
    threads=2,
    api_key=API_KEY,
    image_digest="sha256:" + IMAGE_HEX,
    model="demo",
    model_version="1.0.0",
)


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kdriver, "POLL", 0.01)
    for name in ("KUBECONFIG", kdriver.CONTEXT_ENV, kdriver.NAMESPACE_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[ReplayServer]:
    exchange = load_exchange(request.param, image=IMAGE_HEX, weights=WEIGHTS_HEX, api_key=API_KEY)
    with ReplayServer(tmp_path, exchange) as server:
        monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig()))
        yield server


def sent_objects(replay: ReplayServer) -> list[dict[str, Any]]:
    return [r.body for r in replay.requests if r.method == "POST" and isinstance(r.body, dict)]


@pytest.mark.parametrize("replay", ["install-upgrade-uninstall"], indirect=True)
def test_install_upgrade_list_and_uninstall_follow_the_rollouts(replay: ReplayServer) -> None:
    driver = get_driver("kubernetes")
    assert driver.name == "kubernetes" and isinstance(driver, kdriver.KubernetesDriver)
    assert driver.namespace == "models"  # the kubeconfig context's namespace

    first = driver.start(SPEC)
    assert first.id == "5d0c1f4e-0000-4000-8000-00000000d001" and first.revision == 1
    assert first.endpoint == "http://sc2.models.svc.cluster.local:8080"
    assert driver.wait_healthy(first, timeout=30)

    second = driver.start(dataclasses.replace(SPEC, revision=2, replicas=3))
    assert driver.wait_healthy(second, timeout=30)
    [listed] = driver.list("sc2")
    assert (listed.revision, listed.state, listed.health) == (2, "running", "healthy")
    assert listed.model_digest == SPEC.weights_sha256
    driver.stop(first)  # the Deployment runs revision 2: nothing happens
    driver.stop(second)
    replay.check()

    # what was sent: valid objects, the verified image by digest, the key only in the Secret
    for obj in sent_objects(replay):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    secret, service, deployment, pdb = sent_objects(replay)
    assert secret["stringData"] == {"api-key": API_KEY}
    pod = deployment["spec"]["template"]["spec"]
    image = f"registry.internal:5000/llm/demo@sha256:{IMAGE_HEX}"
    assert pod["containers"][0]["image"] == image and pod["initContainers"][0]["image"] == image
    assert API_KEY not in str(deployment) and API_KEY not in str(service) and pdb["spec"]["minAvailable"] == 1
    assert (
        "--sha256" in pod["containers"][0]["args"] and pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    )
    patch = [r for r in replay.requests if r.method == "PATCH" and r.path.endswith("/deployments/sc2")][0]
    kubernetes_validate.validate({**patch.body, "metadata": {"name": "sc2"}}, K8S_VERSION, strict=True)


@pytest.mark.parametrize("replay", ["upgrade-refused-rollback"], indirect=True)
def test_an_upgrade_whose_weights_are_refused_is_rolled_back_like_rollout_undo(replay: ReplayServer) -> None:
    driver = get_driver("kubernetes")
    new = driver.start(dataclasses.replace(SPEC, revision=2, api_key=None))
    assert not driver.wait_healthy(new, timeout=30)
    log = driver.logs(new, tail=5)
    assert "init container verify-weights exited 1 (the weights are not the pinned bytes)" in log
    assert "rolled back to revision 1" in log
    assert driver.health(new) == "unknown"  # the Deployment runs revision 1 again
    driver.stop(new)  # nothing: revision 1 serves
    driver.remove(new)
    replay.check()
    undo = [r for r in replay.requests if r.method == "PATCH"][-1]
    assert undo.content_type == "application/json-patch+json"
    template = undo.body[1]["value"]
    assert "pod-template-hash" not in template["metadata"]["labels"]  # as kubectl rollout undo strips it
    assert template["metadata"]["labels"]["llmctl.dev/revision"] == "1"
    # the Deployment's own revision annotation is kept, the ReplicaSet's change-cause copied
    assert undo.body[2]["value"] == {
        "deployment.kubernetes.io/revision": "2",
        "kubernetes.io/change-cause": "llmctl revision 1",
    }


@pytest.mark.parametrize("replay", ["install-deadline-exceeded"], indirect=True)
def test_a_first_install_past_its_progress_deadline_fails_with_nothing_to_roll_back_to(
    replay: ReplayServer,
) -> None:
    driver = get_driver("kubernetes")
    first = driver.start(dataclasses.replace(SPEC, api_key=None))
    assert not driver.wait_healthy(first, timeout=30)
    log = driver.logs(first, tail=3)
    assert "exceeded its progress deadline" in log and "rolled back" not in log
    assert "loading model" in log  # the model container's log
    driver.stop(first)
    replay.check()


@pytest.mark.parametrize("replay", ["refusals"], indirect=True)
def test_the_cluster_refusing_is_a_clear_error(replay: ReplayServer) -> None:
    driver = get_driver("kubernetes")
    with pytest.raises(DriverError, match=r"is not llmctl's \(no label app.kubernetes.io/managed-by=llmctl\)"):
        driver.start(SPEC)
    with pytest.raises(DriverError, match=r"forbidden by the cluster \(deployments.apps is forbidden: User"):
        driver.list()
    with pytest.raises(DriverError, match=r'answered 404: namespaces "models" not found'):
        driver.start(dataclasses.replace(SPEC, release="other", api_key=None))
    replay.check()


@pytest.mark.parametrize("replay", ["empty"], indirect=True)
def test_wrong_credentials_and_images_the_cluster_cannot_pull_are_refused(
    replay: ReplayServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(replay.write_kubeconfig(token="not-the-token")))
    with pytest.raises(DriverUnavailableError, match=r"refused llmctl's credentials \(401 Unauthorized\)"):
        get_driver("kubernetes").list()
    for spec, message in (
        (dataclasses.replace(SPEC, image="llmctl/demo:1.0.0"), "not in a registry the cluster can pull from"),
        (dataclasses.replace(SPEC, weights=tmp_path / "w.gguf"), "needs the weights baked into the image"),
        (dataclasses.replace(SPEC, image_digest=""), "registry reference and digest"),
    ):
        with pytest.raises(DriverError, match=message):
            get_driver("kubernetes").start(spec)  # refused before any request
    assert replay.requests == []  # the 401 was the only answer (not an exchange)
    replay.check()


def test_no_kubeconfig_or_no_cluster_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(DriverUnavailableError, match=r"KUBECONFIG=.*/missing: no such file; set KUBECONFIG"):
        get_driver("kubernetes")
    config = tmp_path / "kubeconfig"
    config.write_text("clusters: [\n")  # not YAML
    monkeypatch.setenv("KUBECONFIG", str(config))
    with pytest.raises(DriverUnavailableError, match="no usable Kubernetes configuration"):
        get_driver("kubernetes")
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: 'https://127.0.0.1:{free_port()}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(config))
    driver = get_driver("kubernetes")
    assert driver.namespace == "default"  # the context names none
    with pytest.raises(DriverUnavailableError, match=r"cannot reach the Kubernetes API at https://127.0.0.1:"):
        driver.list()
    monkeypatch.setenv(kdriver.NAMESPACE_ENV, "team-a")
    assert get_driver("kubernetes").namespace == "team-a"
    monkeypatch.setenv(kdriver.CONTEXT_ENV, "nope")
    with pytest.raises(DriverUnavailableError, match="no usable Kubernetes configuration"):
        get_driver("kubernetes")


def test_rollout_status_reads_a_deployment_as_kubectl_does() -> None:
    def dep(generation: int = 1, **status: object) -> dict[str, object]:
        return {
            "metadata": {"generation": generation},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, **status},
        }

    assert kdriver.rollout_status(dep(generation=2))[1] == "waiting for the Deployment spec update to be observed"
    assert kdriver.rollout_status(dep(updatedReplicas=1))[1] == "1 of 2 new replicas have been updated"
    assert kdriver.rollout_status(dep(updatedReplicas=2, replicas=3))[1] == "1 old replicas are pending termination"
    assert kdriver.rollout_status(dep(updatedReplicas=2, replicas=2, availableReplicas=1))[1] == (
        "1 of 2 updated replicas are available"
    )
    assert kdriver.rollout_status(dep(updatedReplicas=2, replicas=2, availableReplicas=2))[0] is True
    deadline = {"conditions": [{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]}
    assert "progress deadline" in str(kdriver.rollout_status(dep(**deadline))[2])


def waiting(reason: str, message: str = "", **extra: object) -> dict[str, object]:
    return {"name": "model", "state": {"waiting": {"reason": reason, "message": message}}, **extra}


CRASHED = {"lastState": {"terminated": {"exitCode": 1}}}
REFUSED = [{"name": "verify-weights", "state": {"terminated": {"exitCode": 1}}}]


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        ({"phase": "Pending", "containerStatuses": [waiting("ContainerCreating")]}, None),
        (
            {"containerStatuses": [waiting("ImagePullBackOff", "Back-off pulling image")]},
            "pod p: container model: ImagePullBackOff: Back-off pulling image",
        ),
        ({"containerStatuses": [waiting("CrashLoopBackOff", **CRASHED)]}, "pod p: container model exited 1"),
        (
            {"initContainerStatuses": REFUSED},
            "pod p: init container verify-weights exited 1 (the weights are not the pinned bytes)",
        ),
        ({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}, "pod p failed: Evicted low on memory"),
    ],
)
def test_a_stuck_pod_is_recognised(status: dict[str, object], problem: str | None) -> None:
    assert kdriver.pod_problem({"metadata": {"name": "p"}, "status": status}) == problem
