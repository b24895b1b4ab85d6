"""Model weights as OCI artifacts in the CNCF ModelPack layout (modelpack/model-spec v1).

A model travels without an image: one manifest with `artifactType`
`application/vnd.cncf.model.manifest.v1+json`, a config `application/vnd.cncf.model.config.v1+json`
(descriptor, modelfs, config: the Go `Model` struct of specs-go/v1/config.go), and one uncompressed
layer per weight file (`application/vnd.cncf.model.weight.v1.raw`, recommended by the spec for big
files) whose `org.opencontainers.image.title` is the file name. An uncompressed layer's digest is
the file's sha256, so the digest a chart pins is the digest of the layer: nothing is re-hashed to
match them up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import RegistryError
from registry.oci.artifact import artifact_manifest

ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.cncf.model.config.v1+json"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"


class ModelArtifactError(RegistryError):
    """An artifact that is not a ModelPack model llmctl can use."""


@dataclass(frozen=True)
class WeightFile:
    name: str  # file name inside the model, e.g. starcoder2-7b-q4.gguf
    digest: str  # sha256:<hex> of the file (= of its raw layer)
    size: int
    path: Path | None = None  # where the bytes are, when they are local


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    family: str  # starcoder2 | starcoder
    quantization: str  # Q8_0, Q4_0, ...
    licenses: tuple[str, ...] = ()
    source_url: str = ""
    doc_url: str = ""


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def config_bytes(card: ModelCard, files: Sequence[WeightFile]) -> bytes:
    """The config blob, keys in the Go struct's order and empty fields omitted (omitempty)."""
    descriptor = {
        "family": card.family,
        "name": card.name,
        "docURL": card.doc_url,
        "sourceURL": card.source_url,
        "version": card.version,
        "licenses": list(card.licenses),
    }
    config = {"architecture": "transformer", "format": "gguf", "quantization": card.quantization}
    return _compact(
        {
            "descriptor": {k: v for k, v in descriptor.items() if v},
            "modelfs": {"type": "layers", "diffIds": [f.digest for f in files]},
            "config": config,
        }
    )


def manifest_bytes(config: bytes, files: Sequence[WeightFile]) -> bytes:
    """The artifact manifest: one raw layer per weight file, named by its title annotation."""
    if not files:
        raise ModelArtifactError("a model artifact needs at least one weight file")
    layers = [
        {"mediaType": WEIGHT_RAW, "digest": f.digest, "size": f.size, "annotations": {FILEPATH: f.name, TITLE: f.name}}
        for f in files
    ]
    return artifact_manifest(ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, config, layers)


def parse_manifest(data: bytes, where: str) -> list[WeightFile]:
    """The weight files a ModelPack manifest lists (nothing local yet)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ModelArtifactError(f"{where}: manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("artifactType") != ARTIFACT_TYPE:
        kind = doc.get("artifactType") if isinstance(doc, dict) else None
        raise ModelArtifactError(f"{where} is not a ModelPack model (artifactType {kind!r}, not {ARTIFACT_TYPE!r})")
    files = []
    for i, layer in enumerate(doc.get("layers") or []):
        annotations = layer.get("annotations") or {}
        name = annotations.get(TITLE) or annotations.get(FILEPATH)
        if layer.get("mediaType") != WEIGHT_RAW:
            continue  # docs, code, configs: not served
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ModelArtifactError(f"{where}: layers[{i}] has no usable file name ({TITLE})")
        files.append(WeightFile(name, str(layer.get("digest")), int(layer.get("size", 0))))
    if not files:
        raise ModelArtifactError(f"{where} has no {WEIGHT_RAW} layer: no weights to serve")
    return files
