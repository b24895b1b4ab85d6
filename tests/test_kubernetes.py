"""`llmctl template CHART --target kubernetes`: objects valid against the Kubernetes schemas (offline),
hardened, and an init step that really refuses weights that are not the pinned bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from manager import cli, kubernetes
from manager.manifest import parse_manifest

CHARTS = Path(__file__).resolve().parent.parent / "charts"
K8S_VERSION = kubernetes_validate.latest_version()


def render(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert cli.main(["template", *args, "--target", "kubernetes"]) == 0
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))


def test_objects_validate_strictly_against_the_kubernetes_schemas(capsys: pytest.CaptureFixture[str]) -> None:
    image = "registry.internal:5000/llm/starcoder2-7b:1.0.0"
    objects = render(
        capsys, "starcoder2-7b", "--name", "sc2", "--replicas", "3", "--network-policy", "--namespace", "models",
        "--set", f"image={image}", "--set", "resources.memory=8g", "--set", "resources.cpus=2",
        "--set", "security.apiKeyEnv=KEY",
    )  # fmt: skip
    assert [o["kind"] for o in objects] == ["Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any schema error
    pod = objects[0]["spec"]["template"]["spec"]
    model = pod["containers"][0]
    assert objects[0]["spec"]["replicas"] == 3 and model["image"] == image
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsNonRoot"] is True
    assert model["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert model["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert model["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "72a8a59486cdcc8549e5a17a5c5ec66b6ce5db71a9408a2800985791a40fbff0" in " ".join(model["args"])
    assert model["env"][-1]["valueFrom"]["secretKeyRef"] == {"name": "sc2-api-key", "key": "api-key"}
    assert objects[3]["spec"]["egress"] == [] and all(o["metadata"]["namespace"] == "models" for o in objects)


def test_one_replica_has_no_disruption_budget_and_mounted_weights_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    objects = render(capsys, "starcoderbase-1b")
    assert [o["kind"] for o in objects] == ["Deployment", "Service"]
    assert cli.main(["template", "starcoderbase-1b", "--target", "kubernetes", "--set", "weights.storage=mount"]) == 1
    assert "needs the weights baked into the image" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sets", "tail"),
    [
        ([], ["--parallel", "3"]),  # the default adds nothing: the server repacks
        (["server.repack=true"], ["--parallel", "3"]),
        (["server.repack=false"], ["--parallel", "3", "--no-repack"]),
    ],
)
def test_server_repack_false_adds_no_repack_to_the_server_args(
    capsys: pytest.CaptureFixture[str], sets: list[str], tail: list[str]
) -> None:
    flags = [f for s in sets for f in ("--set", s)]
    pod = render(capsys, "starcoder2-7b", "--set", "server.parallel=3", *flags)[0]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--parallel") :] == tail


def test_a_non_boolean_server_repack_is_a_one_line_error_naming_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text('server:\n  repack: "false"\n')  # a string, however boolean it looks
    for args, shown in ((["--set", "server.repack=maybe"], "'maybe'"), (["-f", str(values)], "'false'")):
        assert cli.main(["template", "starcoder2-7b", "--target", "kubernetes", *args]) == 1
        assert capsys.readouterr().err == (
            f"llmctl: error: starcoder2-7b: values field server.repack: {shown} is not of type 'boolean'; "
            "check your -f/--set values (values.schema.json)\n"
        )


def test_derived_weights_need_a_built_image_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["template", "starcoder2-3b-q4", "--target", "kubernetes"]) == 1
    assert "build the image first" in capsys.readouterr().err


@pytest.mark.slow
def test_the_init_step_passes_the_pinned_weights_and_refuses_others(tmp_path: Path, docker_client: object) -> None:
    """The init container's command, run for real in the base image against a real file."""
    from manager import base_image
    from registry.oci import Entry, Image, Layer
    from registry.oci.daemon import load
    from runtime.testing.make_model import make_model

    rootfs, _ = base_image.cached_rootfs(
        Path.home() / ".cache" / "llmctl" / "base-rootfs", deb_cache=Path.home() / ".cache" / "llmctl" / "debs",
        allow_newer=True,
    )  # fmt: skip
    weights = make_model(tmp_path / "w.gguf", preset="tiny", wtype="q8_0", seed=3)
    import hashlib

    digest = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    blobs = tmp_path / "blobs"
    image = (
        Image.empty()
        .with_layer(Layer.from_entries(base_image.rootfs_entries(rootfs), blobs))
        .with_layer(Layer.from_entries([Entry.file("models/demo.gguf", weights, mode=0o444)], blobs))
    )
    tag = f"llmctl-test/k8s-init:{image.config_digest[7:19]}"
    load(image, tag)
    m = parse_manifest(
        "apiVersion: llmctl.dev/v1\nkind: Model\nmetadata: {name: demo, version: '1'}\n"
        f"spec:\n  files: [{{path: /x.gguf, sha256: '{digest}'}}]\n  license: x\n",
        "test",
        tmp_path,
    )
    try:
        for pinned, code in ((digest, 0), ("sha256:" + "0" * 64, 1)):
            t = kubernetes.Target(release="r", image=tag, weights_sha256=pinned)
            init = kubernetes.deployment(kubernetes.workload(m, t))["spec"]["template"]["spec"]["initContainers"][0]
            run = subprocess.run(
                ["docker", "run", "--rm", "--read-only", "--user", "65532:65532", "--network", "none",
                 "--entrypoint", init["command"][0], tag, *init["command"][1:]],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert run.returncode == code, run.stderr
            assert ("matches" if code == 0 else "MISMATCH") in run.stdout
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
