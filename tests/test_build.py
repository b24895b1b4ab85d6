"""`llmctl build`: a manifest becomes a verified, reproducible image in the layout and the engine."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from manager import base_image, build, cli, keys
from manager.cache import open_store
from registry.oci.layout import read_layout
from runtime.testing.make_model import make_model

WEIGHTS = "dev.llmctl.model.weights.digest"
CACHE = Path.home() / ".cache" / "llmctl"


@pytest.fixture(scope="module")
def rootfs() -> Path:
    root, _ = base_image.cached_rootfs(CACHE / "base-rootfs", deb_cache=CACHE / "debs", allow_newer=True)
    return root


@pytest.fixture
def manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMCTL_KEY_PASSWORD", "test")
    keys.generate()  # the default trust policy wants signed images
    weights = make_model(tmp_path / "demo.gguf", preset="tiny", wtype="q8_0", seed=5)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    path = tmp_path / "model.yaml"
    path.write_text(
        "apiVersion: llmctl.dev/v1\nkind: Model\n"
        "metadata: {name: demo-q8_0, version: 1.0.0}\n"
        f"spec:\n  files: [{{path: ./demo.gguf, sha256: 'sha256:{digest}'}}]\n  license: bigcode-openrail-m\n"
    )
    return path


@pytest.mark.slow
def test_build_twice_gives_one_digest_layout_and_sbom(
    manifest: Path, rootfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = build.build(manifest, load=False, progress=False, base_rootfs=rootfs)
    second = build.build(manifest, load=False, progress=False, base_rootfs=rootfs)
    assert first.digest == second.digest
    image = read_layout(first.layout, first.tag)  # every blob re-verified on the way back
    assert image.digest == first.digest
    bom = json.loads(first.sbom.read_text())
    for image_name in (first.tag, first.digest):  # `llmctl sbom` finds it by tag or digest
        assert cli.main(["sbom", image_name]) == 0
        assert json.loads(capsys.readouterr().out) == bom
    model = next(c for c in bom["components"] if c["type"] == "machine-learning-model")
    weights_digest = image.config_json()["config"]["Labels"]["dev.llmctl.model.weights.digest"]
    assert any("sha256:" + h["content"] == weights_digest for h in model["hashes"])


@pytest.mark.slow
def test_build_loads_into_the_engine(manifest: Path, rootfs: Path) -> None:
    docker = pytest.importorskip("docker", reason="pip install -r requirements-dev.txt")
    try:
        docker.from_env().ping()
    except Exception as e:
        pytest.skip(f"the Docker engine is not reachable: {e}")
    result = build.build(manifest, load=True, progress=False, base_rootfs=rootfs)
    try:
        out = subprocess.run(
            ["docker", "image", "inspect", "-f", "{{.Id}} {{.Config.User}}", result.tag],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out == [result.image_id, "65532:65532"]
    finally:
        subprocess.run(["docker", "rmi", "-f", result.tag], capture_output=True)


def test_dockerfile_is_rendered_from_the_manifest(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["build", str(manifest), "--dockerfile"]) == 0
    text = capsys.readouterr().out
    assert "USER 65532:65532" in text and "COPY --chmod=0444 demo-q8_0.gguf /models/demo-q8_0.gguf" in text
    assert '"--sha256", "sha256:' in text and text.startswith("# llmctl build")


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda t: t.replace("kind: Model", "kind: Chart"), "field kind: 'Model' was expected"),
        (lambda t: t.replace("version: 1.0.0", "version: ''"), "field metadata.version"),
        (lambda t: t.replace("'sha256:", "'md5:"), "field spec.files[0].sha256"),
        (lambda t: t.replace("license: bigcode-openrail-m\n", ""), "'license' is a required property"),
        (lambda t: t + "  extra: 1\n", "field spec: Additional properties are not allowed"),
        (lambda t: t.replace("metadata: {", "metadata: [{"), ":4:1: not valid YAML/JSON"),
    ],
)
def test_bad_manifests_are_one_line_errors(
    manifest: Path, capsys: pytest.CaptureFixture[str], change: object, expected: str
) -> None:
    manifest.write_text(change(manifest.read_text()))  # type: ignore[operator]
    assert cli.main(["build", str(manifest), "--no-load"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmctl: error: ") and str(manifest) in err and expected in err, err
    assert err.count("\n") == 1


def test_weights_that_do_not_match_the_manifest_build_nothing(
    manifest: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    weights = tmp_path / "demo.gguf"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert cli.main(["build", str(manifest), "--no-load", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "llmctl: error: " in err and "sha256" in err
    assert not (tmp_path / "home" / "data" / "images" / "layout").exists()


def test_sbom_of_an_image_never_built_is_a_clear_error(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sbom", "sha256:" + "0" * 64]) == 1
    assert "no SBOM for sha256:" in capsys.readouterr().err


@pytest.mark.slow
def test_mounted_weights_image_serves_the_cache_file_read_only_and_refuses_another(
    manifest: Path, rootfs: Path, tmp_path: Path, docker_client: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--weights mount`: no weights layer; the container gets the cached file read-only and still
    re-checks it at start, so a different file mounted in its place never serves."""
    from tests.netutil import free_port, wait_for_health

    baked = build.build(manifest, load=False, progress=False, base_rootfs=rootfs)
    baked_layers = len(read_layout(baked.layout, baked.tag).layers)
    result = build.build(manifest, load=True, progress=False, base_rootfs=rootfs, weights_storage="mount")
    assert len(read_layout(result.layout, result.tag).layers) == baked_layers - 1
    assert cli.main(["verify", result.tag]) == 0  # SBOM, label and --sha256 agree
    capsys.readouterr()
    cached = open_store().path(read_layout(result.layout, result.tag).config_json()["config"]["Labels"][WEIGHTS])
    other = make_model(tmp_path / "other.gguf", preset="tiny", wtype="q8_0", seed=6)
    hardening = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp"]
    port = free_port()
    name = f"llmctl-test-mount-{port}"
    try:
        subprocess.run(
            ["docker", "run", "-d", "--name", name, *hardening, "-p", f"127.0.0.1:{port}:8080",
             "-v", f"{cached}:/models/demo-q8_0.gguf:ro", result.tag],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        status = wait_for_health(f"http://127.0.0.1:{port}", 90)
        assert status == 200, subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
        run = subprocess.run(
            ["docker", "run", "--rm", *hardening, "--network", "none",
             "-v", f"{other}:/models/demo-q8_0.gguf:ro", result.tag],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 1 and "weights digest mismatch" in run.stderr
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", result.tag], capture_output=True)


@pytest.mark.slow
def test_derived_q4_weights_are_built_once_verified_and_recorded_in_the_provenance(
    manifest: Path, rootfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`derive: {requantize: Q4_0}`: the pinned Q8_0 file is requantized here; the image serves the
    Q4_0 file, its SBOM pins it, and the provenance lists both digests."""
    import base64

    from manager import images
    from registry.attachments import ATT, SLSA_PROVENANCE_V1

    text = manifest.read_text().replace("metadata: {name: demo-q8_0", "metadata: {name: demo-q4")
    manifest.write_text(text + "  derive: {requantize: Q4_0}\n  quantization: Q4_0\n")
    source = "sha256:" + hashlib.sha256((manifest.parent / "demo.gguf").read_bytes()).hexdigest()
    result = build.build(manifest, load=False, progress=False, base_rootfs=rootfs)
    labels = read_layout(result.layout, result.tag).config_json()["config"]["Labels"]
    served = labels[WEIGHTS]
    assert served != source
    assert cli.main(["verify", result.tag]) == 0  # the SBOM's digest is the Q4_0 file's
    capsys.readouterr()
    att = images.read(images.resolve(result.tag), ATT)
    assert att is not None
    envelope = next(b for b in att.layers if b.annotations["predicateType"] == SLSA_PROVENANCE_V1)
    statement = json.loads(base64.b64decode(json.loads(envelope.data)["payload"]))
    deps = {d["name"]: d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert "sha256:" + deps["demo.gguf"]["digest"]["sha256"] == source
    derived = deps["demo-q4.gguf"]
    assert "sha256:" + derived["digest"]["sha256"] == served
    assert derived["annotations"] == {"derivedFrom": source, "process": "requantize Q4_0"}
    again = build.build(manifest, load=False, progress=False, base_rootfs=rootfs)
    assert again.digest == result.digest  # deterministic requantizer: the same image
