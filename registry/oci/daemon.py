"""Load an `Image` into the local Docker engine without a registry: a docker-archive POSTed to /images/load.

The archive is the `docker save` format: `manifest.json` (`Config`, `RepoTags`, `Layers`), the config
blob as `<hex>.json` and each layer as `<hex>/layer.tar`. The layer files are our gzip blobs as they are:
`docker load` decompresses layers it is given (tested with engine 20.10), and checks them against the
config's diff_ids. Docker's image ID is the sha256 of the config bytes, so it equals `image.config_digest`;
`load` checks that. The archive itself is written deterministically (sorted, mtime 0, numeric owners).
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from registry.oci.errors import DaemonError
from registry.oci.image import Image, canonical_json


def _hex(digest: str) -> str:
    return digest.partition(":")[2]


def _info(name: str, size: int = 0, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
        info.size = size
    return info


def write_docker_archive(image: Image, out: BinaryIO, tags: list[str]) -> None:
    """Write `image` as a `docker save` tar to `out` (streams layer blobs; nothing large in memory).

    Does not re-hash the layer blobs: call `Layer.verify()` first if they could have changed since they
    were built or read (the engine itself checks each layer against the config's diff_ids).
    """
    config = image.config_bytes()
    config_name = f"{_hex(image.config_digest)}.json"
    layer_names = [f"{_hex(layer.digest)}/layer.tar" for layer in image.layers]
    manifest = canonical_json([{"Config": config_name, "RepoTags": list(tags), "Layers": layer_names}])

    members: list[tuple[str, Any]] = [("manifest.json", manifest), (config_name, config)]
    for name, layer in zip(layer_names, image.layers, strict=True):
        members.append((name, layer))
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        written_dirs: set[str] = set()
        for name, content in sorted(members, key=lambda m: m[0]):
            parent = os.path.dirname(name)
            if parent and parent not in written_dirs:
                tar.addfile(_info(parent, directory=True))
                written_dirs.add(parent)
            if isinstance(content, bytes):
                tar.addfile(_info(name, len(content)), io.BytesIO(content))
            else:
                with content.open_compressed() as f:
                    tar.addfile(_info(name, content.size), f)


def load(image: Image, tag: str, client: Any = None) -> str:
    """Load `image` into the Docker engine as `tag`; return its image ID (`sha256:` + config digest).

    `client` is a `docker.DockerClient` (default `docker.from_env()`). Raises `DaemonError` if the engine
    refuses the archive or reports a different ID. Does not remove an older image that had this tag.
    """
    if client is None:
        import docker

        client = docker.from_env()
    with tempfile.TemporaryDirectory(prefix="llmctl-docker-archive-") as tmp:
        archive = Path(tmp) / "image.tar"
        with open(archive, "wb") as f:
            write_docker_archive(image, f, [tag])
        try:
            with open(archive, "rb") as f:
                client.images.load(f)
        except Exception as e:  # docker.errors.APIError and connection errors
            raise DaemonError(f"the Docker engine refused image {image.digest} ({tag}): {e}") from None
    loaded = client.images.get(tag)
    if loaded.id != image.config_digest:
        raise DaemonError(
            f"the Docker engine loaded {tag} as {loaded.id}, expected {image.config_digest} (the config digest)"
        )
    return str(loaded.id)
