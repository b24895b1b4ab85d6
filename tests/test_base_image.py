"""The base image from Debian packages: build the rootfs, load it into Docker, run the runtime in it.

The built rootfs is cached under ~/.cache/llmctl/base-rootfs keyed by the package list, the requirements
and manager/base_image.py, and the .debs under ~/.cache/llmctl/debs, so reruns skip the build.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from manager import base_image
from manager.model_image import runtime_entries
from registry.oci import Image, Layer

pytestmark = pytest.mark.slow

CACHE = Path.home() / ".cache" / "llmctl"
RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"
LIMIT_BYTES = 150 * 1000 * 1000  # the target: <= 150 MB uncompressed


def test_package_lists_are_pinned() -> None:
    packages = base_image.read_packages()
    assert {"libc6", "python3.11-minimal", "libpython3.11-stdlib", "libgomp1", "libssl3"} <= {p.name for p in packages}
    assert all(p.version for p in packages)
    reqs = base_image.read_requirements()
    names = {r.partition("==")[0] for r in reqs}
    assert {"numpy", "tokenizers", "starlette", "uvicorn", "prometheus-client"} <= names
    assert not {"huggingface-hub", "fastapi", "pydantic"} & names  # the server needs neither of the last two


def test_unpinned_package_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "packages.txt"
    bad.write_text("libc6\n")
    with pytest.raises(base_image.BaseImageError, match="name=version"):
        base_image.read_packages(bad)
    req = tmp_path / "requirements.txt"
    req.write_text("numpy>=1\n")
    with pytest.raises(base_image.BaseImageError, match="pinned"):
        base_image.read_requirements(req)


@pytest.fixture(scope="module")
def rootfs() -> tuple[Path, base_image.BuildReport]:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed to build the base image from Debian packages")
    # allow_newer: when Debian has dropped a pinned (superseded) version, test with its successor
    # rather than fail; the build warns about it on stderr
    return base_image.cached_rootfs(CACHE / "base-rootfs", deb_cache=CACHE / "debs", allow_newer=True)


def test_rootfs_layout_and_size(rootfs: tuple[Path, base_image.BuildReport]) -> None:
    root, report = rootfs
    assert (root / "usr/bin/python3").is_symlink() and (root / "usr/bin/python3").readlink() == Path("python3.11")
    assert (root / "lib64").readlink() == Path("usr/lib64")
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert "llmctl:x:65532:65532:" in (root / "etc/passwd").read_text()
    assert "llmctl:x:65532:" in (root / "etc/group").read_text()
    for pruned in ("usr/share/doc", "usr/share/man", "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib",
                   "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/lib2to3", "usr/lib/python3/dist-packages/bin",
                   "usr/lib/python3/dist-packages/numpy/_core/tests"):  # fmt: skip
        assert not (root / pruned).exists(), pruned
    # every module is byte-compiled, checked by source hash (flags 0b01: hash-based, unchecked)
    for module in ("usr/lib/python3.11/json/__init__.py", "usr/lib/python3/dist-packages/numpy/__init__.py"):
        pyc = root / importlib.util.cache_from_source(module)
        assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01, pyc
    assert report.bytecode > 0
    assert sorted(p.name for p in (root / "usr/bin").iterdir()) == ["python3", "python3.11"]
    assert report.total == base_image.tree_size(root)
    assert report.debian["libc6"] > 0 and report.python["numpy"] > 0
    assert report.total <= LIMIT_BYTES, f"base rootfs is {report.total / 1e6:.1f} MB, over 150 MB"


def _run(tag: str, *args: str, volumes: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = ["docker", "run", "--rm", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "--network", "none"]  # fmt: skip
    for volume in volumes:
        cmd += ["-v", volume]
    return subprocess.run([*cmd, tag, *args], capture_output=True, text=True, timeout=300)


def test_base_image_runs_the_runtime(
    tmp_path: Path, rootfs: tuple[Path, base_image.BuildReport], docker_client: object
) -> None:
    from registry.oci.daemon import load
    from runtime.testing.make_model import make_model

    root, _ = rootfs
    base_layer = Layer.from_entries(base_image.rootfs_entries(root), tmp_path / "blobs")
    runtime_layer = Layer.from_entries(runtime_entries(), tmp_path / "blobs")
    image = (
        Image.empty()
        .with_layer(base_layer, created_by="llmctl base: Debian 12 packages + the runtime's wheels")
        .with_layer(runtime_layer, created_by="llmctl runtime (test copy)")
        .with_config(
            user=str(base_image.USER_ID),
            env={
                "PATH": "/usr/bin",
                "PYTHONPATH": "/opt/llmctl",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            },
            entrypoint=["/usr/bin/python3"],
            working_dir="/tmp",
        )
    )
    tag = f"llmctl-base-test:{image.config_digest.partition(':')[2][:12]}"
    try:
        assert load(image, tag, docker_client) == image.config_digest
        inspect = json.loads(
            subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=True).stdout
        )
        assert inspect[0]["RootFS"]["Layers"] == [base_layer.diff_id, runtime_layer.diff_id]
        assert inspect[0]["Config"]["User"] == "65532"

        probe = (
            "import os, ssl, json, asyncio, numpy, tokenizers, runtime.server.serve; "
            "from runtime.kernels import _kernels; print(os.getuid(), os.getgid()); print(_kernels.active())"
        )
        run = _run(tag, "-v", "-c", probe)
        assert run.returncode == 0, run.stderr
        # -v names each module's code: compiled from source ("from /usr/...py") or read from its .pyc;
        # the stdlib, the wheels and the runtime (/opt/llmctl) all come compiled
        compiled = [line for line in run.stderr.splitlines() if line.startswith("# code object from /")]
        assert not compiled, compiled[:5]
        from runtime.kernels import _kernels

        assert run.stdout.splitlines() == ["65532 65532", _kernels.active()]  # same CPU as the host

        model = make_model(tmp_path / "model.gguf", seed=1)
        model.chmod(0o644)
        gen = _run(
            tag, "-m", "runtime", "generate", "-m", "/model.gguf", "-p", "def f():", "-n", "4", "--seed", "1",
            volumes=(f"{model}:/model.gguf:ro",),
        )  # fmt: skip
        assert gen.returncode == 0, gen.stderr
        host = subprocess.run(
            [sys.executable, "-m", "runtime", "generate", "-m", str(model), "-p", "def f():", "-n", "4", "--seed", "1"],
            capture_output=True, text=True, timeout=300, cwd=RUNTIME_DIR.parent,
        )  # fmt: skip
        assert host.returncode == 0, host.stderr
        assert gen.stdout == host.stdout  # same code, same wheels: the same tokens as on the host
        assert gen.stdout.strip()
        assert "generated: 4 tokens" in gen.stderr
    finally:
        subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True, timeout=60)


def test_base_image_sbom_lists_every_package(rootfs: tuple[Path, base_image.BuildReport], tmp_path: Path) -> None:
    """The base records its Debian packages (status.d, no dpkg in the image), so the image's SBOM
    lists each of them and every Python distribution, and validates against CycloneDX 1.6."""
    json_validation = pytest.importorskip("cyclonedx.validation.json", reason="pip install -r requirements-dev.txt")
    from cyclonedx.schema import SchemaVersion

    from manager.sbom_model import model_info_from_gguf, weight_file
    from registry.sbom import build_sbom, sbom_json
    from runtime.testing.make_model import make_model

    root, _ = rootfs
    gguf = make_model(tmp_path / "m.gguf", preset="tiny", wtype="q8_0")
    bom = build_sbom(
        image_name="llmctl/demo",
        image_version="0.1.0",
        model=model_info_from_gguf(gguf, name="demo", version="0.1.0"),
        weights=[weight_file(gguf, image_path="/models/m.gguf")],
        rootfs=root,
        site_packages=[root / base_image.PYTHON_SITE],
        runtime_version="0.1.0",
    )
    error = json_validation.JsonStrictValidator(SchemaVersion.V1_6).validate_str(sbom_json(bom).decode())
    assert error is None, error
    debs = {c["name"]: c["version"] for c in bom["components"] if c.get("purl", "").startswith("pkg:deb/")}
    purls = {c.get("purl", "") for c in bom["components"]}
    status_d = root / "var/lib/dpkg/status.d"
    for package in base_image.read_packages(base_image.PACKAGES_FILE):
        stanza = (status_d / package.name).read_text()
        # the version actually installed (the pinned one, unless Debian dropped it: see allow_newer)
        assert f"\nVersion: {debs[package.name]}\n" in stanza, package.name
    for requirement in base_image.read_requirements(base_image.REQUIREMENTS_FILE):
        name = requirement.split("==")[0].lower().replace("_", "-")
        assert any(p.startswith(f"pkg:pypi/{name}@") for p in purls), name


def test_byte_compiled_modules_are_reproducible(tmp_path: Path) -> None:
    """Two builds of the same modules give the same .pyc bytes (the image digest depends on them),
    named for the image's paths."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip(f"the image's .pyc files are made by a Python 3.11 host, not {sys.version.split()[0]}")
    source = "KINDS = frozenset({'alpha', 'beta', 'gamma', 'delta'})\n\ndef kind(x):\n    return x in {'a', 'b', 'c'}\n"
    builds = []
    for name in ("one", "two"):
        root = tmp_path / name
        for rel in (base_image.PYTHON_STDLIB, base_image.PYTHON_SITE):
            (root / rel / "pkg").mkdir(parents=True)
            (root / rel / "pkg" / "__init__.py").write_text(source)
        dirs = [root / base_image.PYTHON_STDLIB, root / base_image.PYTHON_SITE]
        assert base_image.byte_compile(root, dirs) > 0
        builds.append({p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.pyc"))})
    assert len(builds[0]) == 2 and builds[0] == builds[1]
    # named for the image's paths, not the build directory's
    code = builds[0][Path(base_image.PYTHON_SITE, "pkg/__pycache__/__init__.cpython-311.pyc")]
    assert f"/{base_image.PYTHON_SITE}/pkg/__init__.py".encode() in code and str(tmp_path).encode() not in code
