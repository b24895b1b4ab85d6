"""The per-model image: base (Debian packages) -> weights -> runtime, assembled reproducibly.

The weights layer sits below the runtime layer, so a runtime upgrade ships a few megabytes and two
models share the base and runtime bytes. The entrypoint is `python3 -m runtime serve` with the
weights' pinned digest, so the container re-checks the weights before it serves anything.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from manager.base_image import USER_ID, byte_compile, rootfs_entries
from manager.errors import ImageBuildError
from registry.oci import Entry, Healthcheck, Image, Layer

RUNTIME_PACKAGE = Path(__file__).resolve().parent.parent / "runtime"
RUNTIME_PREFIX = "opt/llmctl"
MODELS_DIR = "models"
PORT = 8080

# the labels verifiers and drivers read back: where the weights are, which bytes they are, whether
# they are mounted rather than in a layer, and what the image was built from
WEIGHTS_PATH_LABEL = "dev.llmctl.model.weights.path"
WEIGHTS_DIGEST_LABEL = "dev.llmctl.model.weights.digest"
WEIGHTS_MOUNTED_LABEL = "dev.llmctl.model.weights.mounted"
BUILD_INPUTS_LABEL = "dev.llmctl.build.inputs"

HEALTHCHECK = Healthcheck(
    test=[
        "CMD",
        "/usr/bin/python3",
        "-c",
        "import sys, urllib.request; "
        f"sys.exit(urllib.request.urlopen('http://127.0.0.1:{PORT}/health', timeout=4).status != 200)",
    ],
    interval_s=10,
    timeout_s=5,
    start_period_s=120,
    retries=3,
)


@dataclass(frozen=True)
class ModelImageSpec:
    """What a chart says about the model an image serves."""

    name: str  # e.g. starcoder2-3b-q4_0
    version: str
    weights: Path  # the verified file in the cache
    weights_sha256: str  # "sha256:<hex>", pinned by the chart
    license: str = "bigcode-openrail-m"
    source: str = ""  # where the weights came from (URL), for the labels
    runtime_version: str = "0.1.0"
    mounted: bool = False  # weights not in the image: mounted read-only at MODELS_DIR when it runs
    build_inputs: str = ""  # digest of everything the image is made from (see manager.build.inputs_digest)

    @property
    def file_name(self) -> str:
        return f"{self.name}.gguf"


def _runtime_files(package: Path) -> list[Path]:
    """The runtime files an image carries, relative to the package's parent: its Python modules and
    its compiled kernels (no tests, no test-model generator, no caches)."""
    files = []
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(package.parent)
        if "__pycache__" in rel.parts or "testing" in rel.parts or not path.is_file():
            continue
        if path.suffix == ".py" or (path.suffix == ".so" and path.name.startswith("_kernels")):
            files.append(rel)
    if not any(rel.suffix == ".so" for rel in files):
        raise ImageBuildError(f"{package}/kernels has no compiled _kernels module: run `make bootstrap` first")
    return files


def runtime_entries(package: Path = RUNTIME_PACKAGE) -> list[Entry]:
    """The runtime's files under /opt/llmctl/runtime, with its modules byte-compiled too (the root
    is read-only: see base_image.byte_compile)."""
    files = _runtime_files(package)
    entries = [Entry.file(f"{RUNTIME_PREFIX}/{rel.as_posix()}", package.parent / rel, mode=0o644) for rel in files]
    with tempfile.TemporaryDirectory(prefix="llmctl-pyc-") as tmp:
        root = Path(tmp)
        staged = root / RUNTIME_PREFIX
        for rel in files:
            if rel.suffix == ".py":
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(package.parent / rel, staged / rel)
        byte_compile(root, [staged / package.name])
        for pyc in sorted(staged.rglob("*.pyc")):
            entries.append(Entry.file(f"{RUNTIME_PREFIX}/{pyc.relative_to(staged).as_posix()}", data=pyc.read_bytes()))
    return entries


def runtime_digest(package: Path = RUNTIME_PACKAGE) -> str:
    """sha256 over the runtime files the image carries (paths and contents): changes with the code.
    The .pyc files are left out (nor compiled here): they are made from these sources."""
    h = hashlib.sha256()
    for rel in _runtime_files(package):
        h.update(f"{RUNTIME_PREFIX}/{rel.as_posix()}".encode() + b"\0")
        h.update((package.parent / rel).read_bytes())
    return "sha256:" + h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def image_from_layers(spec: ModelImageSpec, base: Layer, weights: Layer | None, runtime: Layer) -> Image:
    """Stack the layers (no weights layer for mounted weights) and set how the container runs.
    Checks nothing: see `assemble`."""
    model_path = f"/{MODELS_DIR}/{spec.file_name}"
    labels = {
        "org.opencontainers.image.title": spec.name,
        "org.opencontainers.image.version": spec.version,
        "org.opencontainers.image.licenses": spec.license,
        "org.opencontainers.image.description": f"{spec.name} served by the llmctl runtime",
        "org.opencontainers.image.source": spec.source,
        "dev.llmctl.model.name": spec.name,
        WEIGHTS_PATH_LABEL: model_path,
        WEIGHTS_DIGEST_LABEL: spec.weights_sha256,
        "dev.llmctl.runtime.version": spec.runtime_version,
        WEIGHTS_MOUNTED_LABEL: "true" if spec.mounted else "false",
        BUILD_INPUTS_LABEL: spec.build_inputs,
    }
    image = Image.empty().with_layer(base, created_by="llmctl base: Debian packages and Python wheels")
    if weights is not None:
        image = image.with_layer(weights, created_by=f"weights {spec.file_name} {spec.weights_sha256}")
    return image.with_layer(runtime, created_by=f"llmctl runtime {spec.runtime_version}").with_config(
        user=f"{USER_ID}:{USER_ID}",
        env={
            "PYTHONPATH": f"/{RUNTIME_PREFIX}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "LLMCTL_VERIFY_DIR": "/tmp/llmctl-verified",  # a writable tmpfs, if the container has one
        },
        entrypoint=["/usr/bin/python3", "-m", "runtime", "serve", "-m", model_path],
        cmd=["--host", "0.0.0.0", "--port", str(PORT), "--sha256", spec.weights_sha256],
        exposed_ports=[f"{PORT}/tcp"],
        labels=labels,
        healthcheck=HEALTHCHECK,
        stop_signal="SIGTERM",
    )


def assemble(spec: ModelImageSpec, base_rootfs: Path, workdir: Path) -> Image:
    """The model image for `spec`, after checking the weights file against its pinned digest
    (a mismatch builds nothing). Layer blobs are written under `workdir`."""
    actual = _sha256_file(spec.weights)
    if actual != spec.weights_sha256:
        raise ImageBuildError(
            f"{spec.weights}: expected {spec.weights_sha256}, file has {actual}; refusing to build the image"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    base = Layer.from_entries(rootfs_entries(base_rootfs), workdir)
    weights = None
    if not spec.mounted:
        weights = Layer.from_entries([Entry.file(f"{MODELS_DIR}/{spec.file_name}", spec.weights, mode=0o444)], workdir)
    runtime = Layer.from_entries(runtime_entries(), workdir)
    return image_from_layers(spec, base, weights, runtime)
