"""`llmctl build MANIFEST`: weights (fetched and verified) -> per-model image -> OCI layout + SBOM
-> the Docker engine. `--dockerfile` renders the equivalent Dockerfile instead.

prepare (validate, fetch and verify the weights) then perform (assemble, write, load): a failure
at any step leaves no image and no layout entry behind.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from manager import images, paths, signing
from manager.base_image import PYTHON_SITE, cached_rootfs
from manager.base_image import inputs_digest as base_inputs_digest
from manager.cache import fetch_blob
from manager.errors import ImageBuildError, LlmctlError
from manager.manifest import ModelManifest, load_manifest
from manager.model_image import (
    BUILD_INPUTS_LABEL,
    HEALTHCHECK,
    MODELS_DIR,
    PORT,
    RUNTIME_PREFIX,
    ModelImageSpec,
    assemble,
    runtime_digest,
)
from manager.policy import TrustPolicy, check_license, load_policy
from manager.sbom_model import model_info_from_gguf, weight_file
from manager.verify_image import Verification, verify_image
from registry.errors import RegistryError
from registry.keys import fingerprint
from registry.oci import Image, source_date_epoch
from registry.oci.layout import write_layout
from registry.sbom import ModelInfo, build_sbom, sbom_json

RUNTIME_VERSION = "0.1.0"


@dataclass(frozen=True)
class BuildResult:
    tag: str
    digest: str  # the manifest digest: the image's identity
    image_id: str  # the config digest: Docker's image ID
    layout: Path
    sbom: Path
    loaded: bool
    verification: Verification  # the check against the trust policy the build ended with
    signer: str | None = None  # fingerprint of the signing key


def image_tag(m: ModelManifest) -> str:
    return f"llmctl/{m.name}:{m.version}"


@dataclass(frozen=True)
class ResolvedWeights:
    """The file the image serves: the pinned download, or what was derived from it here."""

    path: Path
    sha256: str  # sha256:<hex> of `path`
    source_sha256: str  # the pinned file's digest
    derivation: str | None = None  # e.g. "requantize Q4_0"


def resolve_weights(m: ModelManifest, *, progress: bool) -> ResolvedWeights:
    """Fetch (or reuse) the pinned file; derive from it if the manifest says so."""
    source = fetch_blob(m.weights_url, m.weights_sha256, pin=f"model-{m.name}", progress=progress)
    if m.requantize is None:
        return ResolvedWeights(source, m.weights_sha256, m.weights_sha256)
    from manager.derive import requantized

    path, digest = requantized(source, m.weights_sha256, m.requantize, pin=f"model-{m.name}-derived", progress=progress)
    return ResolvedWeights(path, digest, m.weights_sha256, f"requantize {m.requantize}")


def check_weights_match_manifest(m: ModelManifest, info: ModelInfo, weights: ResolvedWeights) -> None:
    """What the manifest claims about the model must be what the GGUF header says."""
    for what, claimed, actual in (
        ("architecture", m.architecture, info.architecture),
        ("quantization", m.quantization, info.quantization),
        ("contextLength", m.context_length, info.context_length),
    ):
        if claimed is not None and claimed != actual:
            raise ImageBuildError(
                f"{m.path or m.name}: spec.{what} is {claimed!r} but the weights ({weights.sha256}) say {actual!r}; "
                "fix the manifest or the chart values"
            )


def inputs_digest(m: ModelManifest, storage: str | None = None) -> str:
    """A digest of everything the image is made from: the pinned weights (and how they are derived),
    what the labels say, the base image's pinned inputs and the runtime's code. Equal digests give
    the same image, so an install can reuse an image built before instead of rebuilding it."""
    inputs = {
        "name": m.name,
        "version": m.version,
        "license": m.license,
        "source": m.source,
        "weights": m.weights_sha256,
        "derive": m.requantize,
        "storage": storage or m.weights_storage,
        "base": base_inputs_digest(),
        "runtime": runtime_digest(),
        "runtime_version": RUNTIME_VERSION,
        "epoch": source_date_epoch(),
    }
    return "sha256:" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def find_built(m: ModelManifest, storage: str | None = None) -> str | None:
    """The digest of the image in the local store built from exactly these inputs, if there is one."""
    try:
        ref = images.resolve(m.tag)
        _, labels = images.config_labels(ref.name)
    except (LlmctlError, RegistryError):
        return None
    return ref.digest if labels.get(BUILD_INPUTS_LABEL) == inputs_digest(m, storage) else None


def spec_for(m: ModelManifest, weights: ResolvedWeights, storage: str | None = None) -> ModelImageSpec:
    return ModelImageSpec(
        name=m.name,
        version=m.version,
        weights=weights.path,
        weights_sha256=weights.sha256,
        license=m.license,
        source=m.source,
        runtime_version=RUNTIME_VERSION,
        mounted=(storage or m.weights_storage) == "mount",
        build_inputs=inputs_digest(m, storage),
    )


def _signing_key(manifest: ModelManifest, policy: TrustPolicy, key: str | None, sign: bool) -> Any:
    """Apply the policy before any work: the licence, and a key when the policy wants signed images.
    Returns the decrypted key (asked for now, not after minutes of building) or None."""
    rule = policy.rule_for(f"llmctl/{manifest.name}")
    check_license(policy, rule, manifest.license)
    key_file = signing.signing_key_file(key) if sign else None
    if key_file is None:
        if rule.requires_keys:
            how = "drop --no-sign" if not sign else "create one with `llmctl key generate` or pass --key"
            raise ImageBuildError(
                f"the trust policy ({policy.source}) requires signed images from llmctl/{manifest.name} "
                f"but there is no signing key: {how}"
            )
        return None
    return signing.load_signing_key(key_file)


def _provenance(
    manifest: ModelManifest, image: Image, spec: ModelImageSpec, weights: ResolvedWeights, started: str
) -> dict[str, Any]:
    layers = {"base": image.layers[0], "runtime": image.layers[-1]}
    deps: list[dict[str, Any]] = [
        {
            "uri": manifest.weights_url,
            "name": PurePosixPath(urlsplit(manifest.weights_url).path).name,
            "digest": {"sha256": weights.source_sha256.split(":", 1)[1]},
        },
    ]
    if weights.derivation is not None:  # derived here: the served file, and what it was made from
        deps.append(
            {
                "uri": f"llmctl:derived/{weights.sha256}",
                "name": spec.file_name,
                "digest": {"sha256": weights.sha256.split(":", 1)[1]},
                "annotations": {"derivedFrom": weights.source_sha256, "process": weights.derivation},
            }
        )
    deps += [
        {"uri": f"llmctl:{name}-layer", "name": name, "digest": {"sha256": layer.diff_id.split(":", 1)[1]}}
        for name, layer in layers.items()
    ]
    params = {
        "name": manifest.name,
        "version": manifest.version,
        "license": manifest.license,
        "weights": {
            "url": manifest.weights_url,
            "sha256": manifest.weights_sha256,
            "storage": "mount" if spec.mounted else "image",
            "derive": weights.derivation,
        },
    }
    return signing.provenance(
        manifest=params,
        dependencies=deps,
        started=started,
        finished=signing.utc_now(),
        source_date_epoch=source_date_epoch(),
    )


def build(manifest_path: Path, **options: Any) -> BuildResult:
    """`build_model` for a manifest file."""
    return build_model(load_manifest(manifest_path), **options)


def build_model(
    manifest: ModelManifest,
    *,
    load: bool = True,
    progress: bool = True,
    base_rootfs: Path | None = None,
    key: str | None = None,
    sign: bool = True,
    policy_file: Path | None = None,
    weights_storage: str | None = None,
) -> BuildResult:
    """Build the image of `manifest`, sign it and attach its SBOM and provenance with `key` (a
    name in the key store or a path; default: the store's `cosign` key), then check the result
    against the trust policy before loading it into the engine. `base_rootfs` defaults to the cached
    base for the pinned package lists (built on first use)."""
    policy = load_policy(policy_file)
    private_key = _signing_key(manifest, policy, key, sign)
    started = signing.utc_now()
    weights = resolve_weights(manifest, progress=progress)
    info = model_info_from_gguf(weights.path, name=manifest.name, version=manifest.version)
    check_weights_match_manifest(manifest, info, weights)
    spec = spec_for(manifest, weights, weights_storage)
    rootfs = base_rootfs if base_rootfs is not None else cached_rootfs()[0]
    store = paths.data_dir() / "images"
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmctl-build-", dir=store) as tmp:
        image = assemble(spec, rootfs, Path(tmp) / "blobs")
        bom = build_sbom(
            image_name=f"llmctl/{manifest.name}",
            image_version=manifest.version,
            model=info,
            weights=[weight_file(weights.path, image_path=f"/{MODELS_DIR}/{spec.file_name}")],
            rootfs=rootfs,
            site_packages=[rootfs / PYTHON_SITE],
            runtime_version=RUNTIME_VERSION,
        )
        layout = images.layout_dir()
        write_layout(layout, image, image_tag(manifest))
        sbom_dir = store / "sboms"
        sbom_dir.mkdir(exist_ok=True)
        sbom = sbom_dir / f"{image.digest.split(':', 1)[1]}.cdx.json"
        tmp_sbom = sbom.with_suffix(".tmp")
        tmp_sbom.write_bytes(sbom_json(bom))
        tmp_sbom.replace(sbom)
        signer = None
        if private_key is not None:
            ref = images.ImageRef(image_tag(manifest), f"llmctl/{manifest.name}", image.digest)
            signing.sign_and_attest(
                ref,
                private_key,
                sbom=bom,
                sbom_bytes=sbom_json(bom),
                provenance_predicate=_provenance(manifest, image, spec, weights, started),
            )
            signer = fingerprint(private_key)
        # the build passes its own policy before the engine ever sees the image
        verification = verify_image(image_tag(manifest), policy=policy, enforce_policy=True)
        loaded = False
        if load:
            from registry.oci.daemon import load as load_image

            load_image(image, image_tag(manifest))
            loaded = True
    return BuildResult(
        image_tag(manifest), image.digest, image.config_digest, layout, sbom, loaded, verification, signer
    )


def sbom_path(image: str) -> Path:
    """The SBOM written when `image` (llmctl/NAME:VERSION or sha256:<hex>) was built."""
    from registry.oci.layout import resolve_ref

    store = paths.data_dir() / "images"
    digest = image if image.startswith("sha256:") else resolve_ref(store / "layout", image)
    path = store / "sboms" / f"{digest.split(':', 1)[1]}.cdx.json"
    if not path.is_file():
        raise ImageBuildError(f"no SBOM for {image} ({path}); build the image with `llmctl build`")
    return path


def render_dockerfile(m: ModelManifest, base_image: str = "llmctl/base:bookworm") -> str:
    """A Dockerfile with the same layers and settings, for users who build with their own tools
    (not reproducible by itself: the legacy builder stamps times into layers)."""
    spec = spec_for(m, ResolvedWeights(Path(f"{m.name}.gguf"), m.weights_sha256, m.weights_sha256))
    model_path = f"/{MODELS_DIR}/{spec.file_name}"
    health = json.dumps(HEALTHCHECK.test[1:])
    lines = [
        f"# llmctl build {m.path or m.name} --dockerfile",
        f"# weights: {m.weights_url} ({m.weights_sha256}); fetch and check them first:",
        f"#   llmctl cache fetch {m.weights_url} --sha256 {m.weights_sha256}",
        *(
            [f"#   then requantize: python -m runtime.requantize FILE {spec.file_name} --type {m.requantize}"]
            if m.requantize
            else []
        ),
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
