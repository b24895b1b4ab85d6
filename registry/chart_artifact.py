"""llmctl charts as OCI artifacts (`llmctl chart push | pull oci://...`), the way Helm stores charts:
the packaged `.tgz` as the one layer, `Chart.yaml` as JSON in the config. llmctl charts are not Helm
charts (Jinja2 templates, a Model manifest), so they get their own media types and Helm will not
mistake one for its own."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from registry.errors import RegistryError
from registry.oci.artifact import artifact_manifest

ARTIFACT_TYPE = "application/vnd.llmctl.chart.v1"
CONFIG_MEDIA_TYPE = "application/vnd.llmctl.chart.config.v1+json"
CONTENT_MEDIA_TYPE = "application/vnd.llmctl.chart.content.v1.tar+gzip"
TITLE = "org.opencontainers.image.title"


class ChartArtifactError(RegistryError):
    """An artifact that is not an llmctl chart."""


@dataclass(frozen=True)
class ChartPackage:
    name: str
    version: str
    archive_digest: str  # sha256:<hex> of NAME-VERSION.tgz
    archive_size: int


def config_bytes(meta: dict[str, Any]) -> bytes:
    """Chart.yaml's fields as compact JSON with sorted keys (stable bytes for the same chart)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_bytes(config: bytes, package: ChartPackage) -> bytes:
    layer = {
        "mediaType": CONTENT_MEDIA_TYPE,
        "digest": package.archive_digest,
        "size": package.archive_size,
        "annotations": {TITLE: f"{package.name}-{package.version}.tgz"},
    }
    return artifact_manifest(ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, config, [layer])


def parse_manifest(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config descriptor, content layer descriptor) of a chart artifact manifest."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ChartArtifactError(f"{where}: manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("artifactType") != ARTIFACT_TYPE:
        kind = doc.get("artifactType") if isinstance(doc, dict) else None
        raise ChartArtifactError(f"{where} is not an llmctl chart (artifactType {kind!r}, not {ARTIFACT_TYPE!r})")
    layers = [layer for layer in doc.get("layers") or [] if layer.get("mediaType") == CONTENT_MEDIA_TYPE]
    if len(layers) != 1 or not isinstance(doc.get("config"), dict):
        raise ChartArtifactError(f"{where}: expected one {CONTENT_MEDIA_TYPE} layer and a config")
    return doc["config"], layers[0]
