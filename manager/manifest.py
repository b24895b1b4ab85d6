"""The Model manifest: what one model image is made of, validated by JSON Schema.

Charts render to it (issue 5); `llmctl build` reads it. YAML or JSON:

    apiVersion: llmctl.dev/v1
    kind: Model
    metadata: {name: starcoder2-3b-q4_0, version: 1.0.0}
    spec:
      weights: {url: https://..., sha256: "sha256:<64 hex>"}
      license: bigcode-openrail-m
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manager.errors import LlmctlError
from manager.yamlschema import load_document

API_VERSION = "llmctl.dev/v1"

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "llmctl Model manifest",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "Model"},
        "metadata": {
            "type": "object",
            "required": ["name", "version"],
            "additionalProperties": False,
            "properties": {
                # a Docker repository component and a file name at once
                "name": {"type": "string", "pattern": "^[a-z0-9]+([._-][a-z0-9]+)*$", "maxLength": 100},
                "version": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"},
                "description": {"type": "string"},
            },
        },
        "spec": {
            "type": "object",
            "required": ["weights", "license"],
            "additionalProperties": False,
            "properties": {
                "weights": {
                    "type": "object",
                    "required": ["url", "sha256"],
                    "additionalProperties": False,
                    "properties": {
                        "url": {"type": "string", "pattern": "^(https?://|file://|/|\\./|\\.\\./)"},
                        "sha256": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
                        # image: baked into a layer (one artifact to carry); mount: read-only from the cache
                        "storage": {"enum": ["image", "mount"], "default": "image"},
                    },
                },
                "license": {"type": "string", "minLength": 1},
                "source": {"type": "string"},
            },
        },
    },
}


class ManifestError(LlmctlError):
    """A manifest that cannot be read or does not follow the schema."""


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    weights_url: str
    weights_sha256: str  # "sha256:<hex>"
    license: str
    source: str
    path: Path
    weights_storage: str = "image"  # image | mount


def load_manifest(path: Path) -> ModelManifest:
    """Read and validate a manifest; ManifestError names the file, the line and the first offending field."""
    doc = load_document(
        path, SCHEMA, what="manifest", error=ManifestError, docs_hint="see docs/images.md for the manifest format"
    )
    weights = doc["spec"]["weights"]
    url = weights["url"]
    if not url.startswith(("http://", "https://", "file://", "/")):
        url = str((path.parent / url).resolve())  # relative to the manifest, like Helm's chart files
    return ModelManifest(
        name=doc["metadata"]["name"],
        version=doc["metadata"]["version"],
        weights_url=url,
        weights_sha256=weights["sha256"],
        license=doc["spec"]["license"],
        source=doc["spec"].get("source", weights["url"]),
        path=path,
        weights_storage=weights.get("storage", "image"),
    )
