"""`llmctl build MANIFEST`: weights (fetched and verified) -> per-model image -> OCI layout + SBOM
-> the Docker engine. `--dockerfile` renders the equivalent Dockerfile instead.

prepare (validate, fetch and verify the weights) then perform (assemble, write, load): a failure
at any step leaves no image and no layout entry behind.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from manager import paths
from manager.base_image import PYTHON_SITE, cached_rootfs
from manager.cache import fetch_blob
from manager.errors import ImageBuildError
from manager.manifest import ModelManifest, load_manifest
from manager.model_image import HEALTHCHECK, MODELS_DIR, PORT, RUNTIME_PREFIX, ModelImageSpec, assemble
from manager.sbom_model import model_info_from_gguf, weight_file
from registry.oci.layout import write_layout
from registry.sbom import build_sbom, sbom_json

RUNTIME_VERSION = "0.1.0"


@dataclass(frozen=True)
class BuildResult:
    tag: str
    digest: str  # the manifest digest: the image's identity
    image_id: str  # the config digest: Docker's image ID
    layout: Path
    sbom: Path
    loaded: bool


def image_tag(m: ModelManifest) -> str:
    return f"llmctl/{m.name}:{m.version}"


def spec_for(m: ModelManifest, weights: Path) -> ModelImageSpec:
    return ModelImageSpec(
        name=m.name,
        version=m.version,
        weights=weights,
        weights_sha256=m.weights_sha256,
        license=m.license,
        source=m.source,
        runtime_version=RUNTIME_VERSION,
    )


def build(
    manifest_path: Path, *, load: bool = True, progress: bool = True, base_rootfs: Path | None = None
) -> BuildResult:
    """Build the image of `manifest_path`. `base_rootfs` defaults to the cached base for the pinned
    package lists (built on first use)."""
    manifest = load_manifest(manifest_path)
    weights = fetch_blob(manifest.weights_url, manifest.weights_sha256, pin=f"model-{manifest.name}", progress=progress)
    spec = spec_for(manifest, weights)
    rootfs = base_rootfs if base_rootfs is not None else cached_rootfs()[0]
    images = paths.data_dir() / "images"
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmctl-build-", dir=images) as tmp:
        image = assemble(spec, rootfs, Path(tmp) / "blobs")
        bom = build_sbom(
            image_name=f"llmctl/{manifest.name}",
            image_version=manifest.version,
            model=model_info_from_gguf(weights, name=manifest.name, version=manifest.version),
            weights=[weight_file(weights, image_path=f"/{MODELS_DIR}/{spec.file_name}")],
            rootfs=rootfs,
            site_packages=[rootfs / PYTHON_SITE],
            runtime_version=RUNTIME_VERSION,
        )
        layout = images / "layout"
        write_layout(layout, image, image_tag(manifest))
        sbom_dir = images / "sboms"
        sbom_dir.mkdir(exist_ok=True)
        sbom = sbom_dir / f"{image.digest.split(':', 1)[1]}.cdx.json"
        tmp_sbom = sbom.with_suffix(".tmp")
        tmp_sbom.write_bytes(sbom_json(bom))
        tmp_sbom.replace(sbom)
        loaded = False
        if load:
            from registry.oci.daemon import load as load_image

            load_image(image, image_tag(manifest))
            loaded = True
    return BuildResult(image_tag(manifest), image.digest, image.config_digest, layout, sbom, loaded)


def sbom_path(image: str) -> Path:
    """The SBOM written when `image` (llmctl/NAME:VERSION or sha256:<hex>) was built."""
    from registry.oci.layout import resolve_ref

    images = paths.data_dir() / "images"
    digest = image if image.startswith("sha256:") else resolve_ref(images / "layout", image)
    path = images / "sboms" / f"{digest.split(':', 1)[1]}.cdx.json"
    if not path.is_file():
        raise ImageBuildError(f"no SBOM for {image} ({path}); build the image with `llmctl build`")
    return path


def render_dockerfile(manifest_path: Path, base_image: str = "llmctl/base:bookworm") -> str:
    """A Dockerfile with the same layers and settings, for users who build with their own tools
    (not reproducible by itself: the legacy builder stamps times into layers)."""
    m = load_manifest(manifest_path)
    spec = spec_for(m, Path(f"{m.name}.gguf"))
    model_path = f"/{MODELS_DIR}/{spec.file_name}"
    health = json.dumps(HEALTHCHECK.test[1:])
    lines = [
        f"# llmctl build {manifest_path} --dockerfile",
        f"# weights: {m.weights_url} ({m.weights_sha256}); fetch and check them first:",
        f"#   llmctl cache fetch {m.weights_url} --sha256 {m.weights_sha256}",
        f"FROM {base_image}",
        f"COPY --chmod=0444 {spec.file_name} {model_path}",
        f"COPY runtime /{RUNTIME_PREFIX}/runtime",
        f"ENV PYTHONPATH=/{RUNTIME_PREFIX} PYTHONDONTWRITEBYTECODE=1 LLMCTL_VERIFY_DIR=/tmp/llmctl-verified",
        f'LABEL org.opencontainers.image.title="{m.name}" org.opencontainers.image.version="{m.version}" \\',
        f'      org.opencontainers.image.licenses="{m.license}" dev.llmctl.model.weights.digest="{m.weights_sha256}"',
        "USER 65532:65532",
        f"EXPOSE {PORT}",
        f"HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD {health}",
        "STOPSIGNAL SIGTERM",
        f'ENTRYPOINT ["/usr/bin/python3", "-m", "runtime", "serve", "-m", "{model_path}"]',
        f'CMD ["--host", "0.0.0.0", "--port", "{PORT}", "--sha256", "{m.weights_sha256}"]',
    ]
    return "\n".join(lines) + "\n"
