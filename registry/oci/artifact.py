"""OCI manifests whose layers are plain blobs, not tar files: cosign signatures, attestations, SBOMs.

cosign stores each attachment of an image as an ordinary OCI image manifest in the image's repository,
tagged ``sha256-<hex>.sig`` / ``.att`` / ``.sbom``; each layer is one payload (a simple-signing JSON, a
DSSE envelope, a CycloneDX document) with its annotations. The config is go-containerregistry's
``empty.Image`` after ``mutate.Append``, marshalled in Go struct order, so the bytes match what cosign
writes (233 bytes for one layer, as in cosign's documentation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from registry.oci.errors import LayoutError
from registry.oci.image import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, sha256_digest

GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def _go_json(obj: Any) -> bytes:
    """Compact JSON in the caller's key order (Go struct order), as encoding/json writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Blob:
    """One layer of an attachment manifest: the payload bytes, their media type and annotations."""

    media_type: str
    data: bytes
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "size": len(self.data), "digest": self.digest}
        if self.annotations:
            d["annotations"] = dict(sorted(self.annotations.items()))  # Go marshals maps sorted
        return d


def cosign_config(layers: Sequence[Blob]) -> bytes:
    """The config blob cosign writes for an attachment manifest with these layers."""
    return _go_json(
        {
            "architecture": "",
            "created": GO_ZERO_TIME,
            "history": [{"created": GO_ZERO_TIME} for _ in layers],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layers]},
            "config": {},
        }
    )


def attachment_manifest(layers: Sequence[Blob], config: bytes) -> bytes:
    """The manifest bytes: go-containerregistry's Manifest struct order, compact JSON."""
    return _go_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "size": len(config), "digest": sha256_digest(config)},
            "layers": [b.descriptor() for b in layers],
        }
    )


@dataclass(frozen=True)
class Attachment:
    """An attachment manifest with its config and layer payloads, every byte verified by digest."""

    manifest: bytes
    config: bytes
    layers: tuple[Blob, ...]

    @classmethod
    def of(cls, layers: Sequence[Blob]) -> Attachment:
        config = cosign_config(layers)
        return cls(attachment_manifest(layers, config), config, tuple(layers))

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    def with_layer(self, layer: Blob) -> Attachment:
        """This attachment with `layer` appended (unless an identical layer is already there)."""
        if any(b.digest == layer.digest and dict(b.annotations) == dict(layer.annotations) for b in self.layers):
            return self
        return Attachment.of([*self.layers, layer])

    def blobs(self) -> dict[str, bytes]:
        """Every blob the manifest references, by digest."""
        out = {sha256_digest(self.config): self.config}
        out.update({b.digest: b.data for b in self.layers})
        return out


def parse_attachment(manifest: bytes, fetch: Any, where: str) -> Attachment:
    """Read an attachment from its manifest bytes; `fetch(descriptor) -> bytes` returns verified blobs.

    Layer annotations are kept as strings; anything else is refused with a message naming `where`."""
    try:
        doc = json.loads(manifest)
    except (ValueError, UnicodeDecodeError):
        raise LayoutError(f"{where}: attachment manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("mediaType", MANIFEST_MEDIA_TYPE) != MANIFEST_MEDIA_TYPE:
        raise LayoutError(f"{where}: attachment is not an OCI image manifest")
    config_desc, layer_descs = doc.get("config"), doc.get("layers")
    if not isinstance(config_desc, dict) or not isinstance(layer_descs, list):
        raise LayoutError(f"{where}: attachment manifest has no config or layers")
    layers = []
    for i, desc in enumerate(layer_descs):
        annotations = desc.get("annotations") or {} if isinstance(desc, dict) else None
        if not isinstance(desc, dict) or not isinstance(annotations, dict):
            raise LayoutError(f"{where}: layers[{i}] is not a descriptor")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise LayoutError(f"{where}: layers[{i}].annotations must map strings to strings")
        layers.append(Blob(str(desc.get("mediaType", "")), fetch(desc), annotations))
    return Attachment(manifest, fetch(config_desc), tuple(layers))


def artifact_manifest(
    artifact_type: str, config_media_type: str, config: bytes, layers: Sequence[Mapping[str, Any]]
) -> bytes:
    """An OCI 1.1 artifact manifest (an image manifest with `artifactType`), compact JSON in
    go-containerregistry's struct order; `layers` are descriptors (mediaType, digest, size, annotations)."""
    return _go_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": artifact_type,
            "config": {"mediaType": config_media_type, "digest": sha256_digest(config), "size": len(config)},
            "layers": [dict(layer) for layer in layers],
        }
    )
