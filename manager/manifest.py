"""The Model manifest: what one model image is made of and how it runs, validated by JSON Schema.

Charts render to it; `llmctl build` and `llmctl install` read it. YAML or JSON (docs/manifest.md):

    apiVersion: llmctl.dev/v1
    kind: Model
    metadata: {name: starcoder2-7b-q4, version: 1.0.0}
    spec:
      architecture: starcoder2
      quantization: Q4_0
      contextLength: 16384
      license: bigcode-openrail-m
      files:
        - {url: https://.../starcoder2-7b_Q8_0.gguf, sha256: "sha256:<64 hex>", size: 7625000000}
      derive: {requantize: Q4_0}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager.errors import LlmctlError
from manager.yamlschema import load_document, load_text

API_VERSION = "llmctl.dev/v1"
DOCS_HINT = "see docs/manifest.md for the manifest format"
QUANTIZATIONS = ["F32", "F16", "Q8_0", "Q4_0", "Q6_K"]
_NAME = {"type": "string", "pattern": "^[a-z0-9]+([._-][a-z0-9]+)*$", "maxLength": 100}
_DIGEST = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://llmctl.dev/schemas/model-v1.json",
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
                "name": _NAME,  # a Docker repository component and a file name at once
                "version": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$"},
                "description": {"type": "string"},
            },
        },
        "spec": {
            "type": "object",
            "required": ["files", "license"],
            "additionalProperties": False,
            "properties": {
                "architecture": {"enum": ["starcoder2", "starcoder"]},
                "quantization": {"enum": QUANTIZATIONS},
                "contextLength": {"type": "integer", "minimum": 1},
                "license": {"type": "string", "minLength": 1},
                "source": {"type": "string"},  # where the model comes from (model card, homepage)
                "files": {  # a GGUF model is one file; a list so that split files can come later
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["sha256"],
                        "additionalProperties": False,
                        "properties": {
                            "url": {"type": "string", "pattern": "^(https?|file)://"},
                            "path": {"type": "string", "minLength": 1},  # relative to the manifest
                            "sha256": _DIGEST,
                            "size": {"type": "integer", "minimum": 1},
                        },
                        "oneOf": [{"required": ["url"]}, {"required": ["path"]}],
                    },
                },
                # image: baked into a layer (one artifact to carry); mount: read-only from the cache
                "storage": {"enum": ["image", "mount"]},
                # run this signed image from a registry (built once elsewhere) instead of building one here
                "image": {
                    "type": ["string", "null"],
                    "pattern": "^[a-z0-9.-]+(:[0-9]+)?/[^ @]+(:[A-Za-z0-9_.-]+|@sha256:[0-9a-f]{64})$",
                },
                # weights made here from the pinned file, deterministically (the provenance keeps both digests)
                "derive": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["requantize"],
                    "properties": {"requantize": {"enum": ["Q4_0"]}},
                },
                "fim": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {k: {"type": "string", "minLength": 1} for k in ("prefix", "suffix", "middle")},
                },
                "server": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "threads": {"type": ["integer", "null"], "minimum": 1, "maximum": 1024},
                        "context": {"type": ["integer", "null"], "minimum": 16},
                        "parallel": {"type": ["integer", "null"], "minimum": 1, "maximum": 256},
                        "repack": {"type": ["boolean", "null"]},  # false: runtime serve --no-repack
                    },
                },
                "resources": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cpus": {"type": ["number", "null"], "exclusiveMinimum": 0},
                        "memory": {"type": ["string", "null"], "pattern": "^[0-9]+[kmg]?$"},
                    },
                },
                "network": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "host": {"type": ["string", "null"], "minLength": 1},  # 127.0.0.1 unless asked
                        "port": {"type": ["integer", "null"], "minimum": 0, "maximum": 65535},  # 0: any free port
                    },
                },
                "security": {
                    "type": "object",
                    "additionalProperties": False,
                    # null in any optional setting means "the default" (charts render their values as they are)
                    # clients must send this bearer token; the value is read from the environment at install
                    "properties": {"apiKeyEnv": {"type": ["string", "null"], "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}},
                },
            },
        },
    },
}


class ManifestError(LlmctlError):
    """A manifest that cannot be read or does not follow the schema."""


@dataclass(frozen=True)
class Fim:
    prefix: str = "<fim_prefix>"
    suffix: str = "<fim_suffix>"
    middle: str = "<fim_middle>"


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    weights_url: str  # where the pinned file comes from: a URL or an absolute path
    weights_sha256: str  # "sha256:<hex>" of that file
    license: str
    source: str
    path: Path | None  # the manifest file, when read from one
    weights_storage: str = "image"  # image | mount
    weights_size: int | None = None
    requantize: str | None = None  # derive the served weights from the pinned file
    description: str = ""
    architecture: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    fim: Fim = field(default_factory=Fim)
    threads: int | None = None
    context: int | None = None
    parallel: int | None = None
    repack: bool = True  # repack Q4_0 and Q8_0 matrices after load (False: --no-repack)
    cpus: float | None = None
    memory: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    api_key_env: str | None = None
    image: str | None = None  # a registry image to pull and verify instead of building
    doc: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def repository(self) -> str:
        return f"llmctl/{self.name}"

    @property
    def tag(self) -> str:
        return f"{self.repository}:{self.version}"


def from_document(doc: dict[str, Any], base_dir: Path, path: Path | None = None) -> ModelManifest:
    """A validated document as a ModelManifest; relative `path`s resolve against `base_dir`."""
    spec = doc["spec"]
    file = spec["files"][0]
    location = file.get("url") or str((base_dir / file["path"]).resolve())
    server, resources, network = spec.get("server", {}), spec.get("resources", {}), spec.get("network", {})
    return ModelManifest(
        name=doc["metadata"]["name"],
        version=doc["metadata"]["version"],
        description=doc["metadata"].get("description", ""),
        weights_url=location,
        weights_sha256=file["sha256"],
        weights_size=file.get("size"),
        license=spec["license"],
        source=spec.get("source", location),
        path=path,
        weights_storage=spec.get("storage", "image"),
        requantize=(spec.get("derive") or {}).get("requantize"),
        architecture=spec.get("architecture"),
        quantization=spec.get("quantization"),
        context_length=spec.get("contextLength"),
        fim=Fim(**spec.get("fim", {})),
        threads=server.get("threads"),
        context=server.get("context"),
        parallel=server.get("parallel"),
        repack=server.get("repack") is not False,  # null: the default
        cpus=resources.get("cpus"),
        memory=resources.get("memory"),
        host=network.get("host") or "127.0.0.1",
        port=network.get("port") or 0,
        api_key_env=(spec.get("security") or {}).get("apiKeyEnv"),
        image=spec.get("image"),
        doc=doc,
    )


def load_manifest(path: Path) -> ModelManifest:
    """Read and validate a manifest; ManifestError names the file, the line and the first offending field."""
    doc = load_document(path, SCHEMA, what="manifest", error=ManifestError, docs_hint=DOCS_HINT)
    return from_document(doc, path.parent, path)


def parse_manifest(text: str, source: str, base_dir: Path) -> ModelManifest:
    """A manifest rendered by a chart (`source` names the chart and template in errors)."""
    doc = load_text(text, source, SCHEMA, what="manifest", error=ManifestError, docs_hint=DOCS_HINT)
    return from_document(doc, base_dir)


def schema_json() -> str:
    """The published JSON Schema (docs/manifest.md, `llmctl manifest schema`)."""
    return json.dumps(SCHEMA, indent=2) + "\n"
