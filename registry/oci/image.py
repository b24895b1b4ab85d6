"""An immutable OCI image: a config JSON plus layers, serialized canonically so digests are stable.

`Image.empty()` then `with_layer(...)` / `with_config(...)` (each returns a new image, like
go-containerregistry's `mutate`). The config is the OCI image config with Docker's `Healthcheck`
extension; `created` everywhere is SOURCE_DATE_EPOCH (or 1970-01-01T00:00:00Z). JSON is written with
sorted keys and no whitespace, so the config digest depends only on its content, the manifest digest
(= the image digest) only on the config digest and the layers.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from registry.oci.layer import Layer, source_date_epoch

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def created_timestamp() -> str:
    """RFC 3339 UTC of SOURCE_DATE_EPOCH (or 0): `1970-01-01T00:00:00Z`."""
    return datetime.fromtimestamp(source_date_epoch(), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Healthcheck:
    """Docker's healthcheck (the OCI config has none; Docker reads `config.Healthcheck`)."""

    test: Sequence[str]
    interval_s: float = 30.0
    timeout_s: float = 30.0
    start_period_s: float = 0.0
    retries: int = 3

    def to_json(self) -> dict[str, Any]:
        ns = 1_000_000_000
        return {
            "Test": list(self.test),
            "Interval": int(self.interval_s * ns),
            "Timeout": int(self.timeout_s * ns),
            "StartPeriod": int(self.start_period_s * ns),
            "Retries": self.retries,
        }


@dataclass(frozen=True)
class Image:
    """Config + layers. Never modified in place: every `with_*` returns a new `Image`.

    `raw_config` / `raw_manifest` keep the exact bytes of an image read from storage (already verified
    against their digests), so its digest is preserved even if they were not written canonically; any
    change drops them and the image is serialized canonically again.
    """

    config_file: Mapping[str, Any]
    layers: tuple[Layer, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    raw_config: bytes | None = None
    raw_manifest: bytes | None = None

    @classmethod
    def empty(cls, *, architecture: str = "amd64", os: str = "linux") -> Image:
        return cls(
            config_file={
                "architecture": architecture,
                "os": os,
                "created": created_timestamp(),
                "config": {},
                "history": [],
            }
        )

    # -- changes: new images ---------------------------------------------------------------------

    def with_layer(self, layer: Layer, *, created_by: str = "", comment: str = "") -> Image:
        """This image with `layer` on top, and a history entry with the fixed `created` time."""
        cfg = copy.deepcopy(dict(self.config_file))
        entry: dict[str, Any] = {"created": created_timestamp()}
        if created_by:
            entry["created_by"] = created_by
        if comment:
            entry["comment"] = comment
        cfg.setdefault("history", []).append(entry)
        return Image(cfg, (*self.layers, layer), dict(self.annotations))

    def with_config(
        self,
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        entrypoint: Sequence[str] | None = None,
        cmd: Sequence[str] | None = None,
        working_dir: str | None = None,
        labels: Mapping[str, str] | None = None,
        exposed_ports: Sequence[str] | None = None,
        healthcheck: Healthcheck | None = None,
        stop_signal: str | None = None,
    ) -> Image:
        """This image with the given run settings replaced (None leaves a setting as it is).

        `env` and `labels` replace the whole set; `exposed_ports` are like `8080/tcp`.
        """
        cfg = copy.deepcopy(dict(self.config_file))
        run: dict[str, Any] = cfg.setdefault("config", {})
        if user is not None:
            run["User"] = user
        if env is not None:
            run["Env"] = [f"{k}={v}" for k, v in env.items()]
        if entrypoint is not None:
            run["Entrypoint"] = list(entrypoint)
        if cmd is not None:
            run["Cmd"] = list(cmd)
        if working_dir is not None:
            run["WorkingDir"] = working_dir
        if labels is not None:
            run["Labels"] = dict(labels)
        if exposed_ports is not None:
            run["ExposedPorts"] = {port: {} for port in exposed_ports}
        if healthcheck is not None:
            run["Healthcheck"] = healthcheck.to_json()
        if stop_signal is not None:
            run["StopSignal"] = stop_signal
        return Image(cfg, self.layers, dict(self.annotations))

    def with_annotations(self, annotations: Mapping[str, str]) -> Image:
        """This image with manifest annotations replaced (they change the image digest, not the config)."""
        return Image(copy.deepcopy(dict(self.config_file)), self.layers, dict(annotations))

    # -- serialization ---------------------------------------------------------------------------

    def config_json(self) -> dict[str, Any]:
        """The full config object, with `rootfs.diff_ids` taken from the layers."""
        cfg = copy.deepcopy(dict(self.config_file))
        cfg["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]}
        return cfg

    def config_bytes(self) -> bytes:
        return self.raw_config if self.raw_config is not None else canonical_json(self.config_json())

    @property
    def config_digest(self) -> str:
        """sha256 of the config blob; Docker's image ID is this same digest."""
        return sha256_digest(self.config_bytes())

    def config_descriptor(self) -> dict[str, Any]:
        data = self.config_bytes()
        return {"mediaType": CONFIG_MEDIA_TYPE, "digest": sha256_digest(data), "size": len(data)}

    def manifest_json(self) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": self.config_descriptor(),
            "layers": [layer.descriptor() for layer in self.layers],
        }
        if self.annotations:
            manifest["annotations"] = dict(self.annotations)
        return manifest

    def manifest_bytes(self) -> bytes:
        return self.raw_manifest if self.raw_manifest is not None else canonical_json(self.manifest_json())

    @property
    def digest(self) -> str:
        """The image digest: sha256 of the manifest (what a registry reference `@sha256:` names)."""
        return sha256_digest(self.manifest_bytes())

    def manifest_descriptor(self) -> dict[str, Any]:
        data = self.manifest_bytes()
        return {"mediaType": MANIFEST_MEDIA_TYPE, "digest": sha256_digest(data), "size": len(data)}
