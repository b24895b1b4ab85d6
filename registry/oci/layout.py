"""An OCI image layout directory: `oci-layout`, `index.json`, `blobs/sha256/<hex>`.

`write_layout` adds one image under a reference name; `read_layout` reads it back and verifies every
blob it touches (manifest, config, each layer's digest, size and diff_id) before returning an `Image`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from registry.oci.artifact import Attachment, parse_attachment
from registry.oci.errors import BlobVerificationError, LayoutError
from registry.oci.image import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, Image, canonical_json, sha256_digest
from registry.oci.layer import CHUNK, Layer

REF_NAME = "org.opencontainers.image.ref.name"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}


def _blob_path(root: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
        raise LayoutError(f"unsupported or malformed digest {digest!r} (only sha256 is read)")
    return root / "blobs" / "sha256" / hexdigest


def _hash_file(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return f"sha256:{sha.hexdigest()}", size


def _verify_file(path: Path, digest: str, size: int) -> None:
    if not path.is_file():
        raise BlobVerificationError(f"blob {digest} is missing: {path} does not exist")
    got, got_size = _hash_file(path)
    if got != digest or got_size != size:
        raise BlobVerificationError(
            f"blob {digest} ({size} bytes) at {path} has digest {got} ({got_size} bytes): it is corrupt or was "
            "altered; refusing it (write the image again)"
        )


def _read_verified(root: Path, descriptor: dict[str, Any]) -> bytes:
    digest, size = str(descriptor.get("digest", "")), descriptor.get("size")
    if not isinstance(size, int) or size < 0:
        raise LayoutError(f"descriptor of {digest} has no valid size")
    path = _blob_path(root, digest)
    if not path.is_file():
        raise BlobVerificationError(f"blob {digest} is missing: {path} does not exist")
    data = path.read_bytes()
    got = f"sha256:{hashlib.sha256(data).hexdigest()}"
    if got != digest or len(data) != size:
        raise BlobVerificationError(
            f"blob {digest} ({size} bytes) at {path} has digest {got} ({len(data)} bytes): it is corrupt or was "
            "altered; refusing it (write the image again)"
        )
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _put_blob_bytes(root: Path, digest: str, data: bytes) -> None:
    path = _blob_path(root, digest)
    if path.is_file() and path.read_bytes() == data:
        return
    _write_atomic(path, data)


def _put_layer(root: Path, layer: Layer) -> None:
    path = _blob_path(root, layer.digest)
    if path.is_file():
        got, size = _hash_file(path)
        if got == layer.digest and size == layer.size:
            return
    layer.verify(check_diff_id=False)  # never copy a corrupt source blob into the layout
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        shutil.copyfile(layer.path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_layout(root: str | os.PathLike[str], image: Image, ref_name: str) -> dict[str, Any]:
    """Write `image`'s blobs into the layout at `root` (created if needed) and name it `ref_name`.

    An existing entry with the same ref name is replaced; other images in the index are kept. Blobs
    already present with the right digest are not rewritten. Does not garbage-collect unreferenced blobs.
    Returns the manifest descriptor added to index.json.
    """
    root = Path(root)
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for layer in image.layers:
        _put_layer(root, layer)
    config = image.config_bytes()
    _put_blob_bytes(root, image.config_digest, config)
    manifest = image.manifest_bytes()
    _put_blob_bytes(root, image.digest, manifest)

    return _name_manifest(root, image.manifest_descriptor(), ref_name)


def _name_manifest(root: Path, manifest_descriptor: dict[str, Any], ref_name: str) -> dict[str, Any]:
    """Point `ref_name` in index.json at the manifest (written last, so a reader never sees a name
    whose blobs are not all there)."""
    _write_atomic(root / "oci-layout", canonical_json(LAYOUT_FILE))
    index_path = root / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
    if index_path.is_file():
        index = _load_json(index_path.read_bytes(), str(index_path))
    descriptor = {**manifest_descriptor, "annotations": {REF_NAME: ref_name}}
    index["manifests"] = [
        m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(REF_NAME) != ref_name
    ] + [descriptor]
    _write_atomic(index_path, canonical_json(index))
    return descriptor


def write_attachment(root: str | os.PathLike[str], attachment: Attachment, ref_name: str) -> dict[str, Any]:
    """Write a signature/attestation/SBOM attachment and name it `ref_name` (replacing an older one)."""
    root = Path(root)
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for digest, data in attachment.blobs().items():
        _put_blob_bytes(root, digest, data)
    _put_blob_bytes(root, attachment.digest, attachment.manifest)
    descriptor = {"mediaType": MANIFEST_MEDIA_TYPE, "digest": attachment.digest, "size": len(attachment.manifest)}
    return _name_manifest(root, descriptor, ref_name)


def read_attachment(root: str | os.PathLike[str], ref_name: str) -> Attachment | None:
    """The attachment named `ref_name`, every blob verified; None when the layout has no such name."""
    root = Path(root)
    if not (root / "index.json").is_file():
        return None
    index = _load_json(_read_index(root), "index.json")
    found = [m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(REF_NAME) == ref_name]
    if not found:
        return None
    manifest = _read_verified(root, found[0])
    return parse_attachment(manifest, lambda desc: _read_verified(root, desc), f"{root}: {ref_name}")


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise LayoutError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LayoutError(f"{what} is not a JSON object")
    return obj


def list_refs(root: str | os.PathLike[str]) -> list[str]:
    """The ref names in the layout's index.json, in index order."""
    index = _load_json(_read_index(Path(root)), "index.json")
    return [
        str(m["annotations"][REF_NAME]) for m in index.get("manifests", []) if REF_NAME in (m.get("annotations") or {})
    ]


def resolve_ref(root: str | os.PathLike[str], ref_name: str) -> str:
    """The manifest digest the layout's index names `ref_name` (no blob is read: nothing verified)."""
    index = _load_json(_read_index(Path(root)), "index.json")
    for m in index.get("manifests", []):
        if (m.get("annotations") or {}).get(REF_NAME) == ref_name:
            return str(m["digest"])
    raise LayoutError(f"{root}: no image named {ref_name!r} (it has: {', '.join(list_refs(root)) or 'none'})")


def _read_index(root: Path) -> bytes:
    if not (root / "oci-layout").is_file() or not (root / "index.json").is_file():
        raise LayoutError(f"{root} is not an OCI image layout (no oci-layout or index.json)")
    layout = _load_json((root / "oci-layout").read_bytes(), "oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise LayoutError(f"{root}/oci-layout: unsupported imageLayoutVersion {layout.get('imageLayoutVersion')!r}")
    return (root / "index.json").read_bytes()


def read_layout(root: str | os.PathLike[str], ref_name: str | None = None, *, check_diff_ids: bool = True) -> Image:
    """Read the image named `ref_name` (or the only image) from the layout, verifying every blob.

    A blob whose sha256 or size differs from its descriptor raises `BlobVerificationError` naming the
    digest; layers are also decompressed and checked against the config's diff_ids unless
    `check_diff_ids=False` (that reads each layer twice). Layers of the returned image point at the
    layout's blobs: they are not copied.
    """
    root = Path(root)
    index = _load_json(_read_index(root), "index.json")
    manifests = [m for m in index.get("manifests", []) if isinstance(m, dict)]
    if ref_name is not None:
        manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == ref_name]
    if len(manifests) != 1:
        names = list_refs(root)
        want = f"ref {ref_name!r}" if ref_name is not None else "exactly one image (give a ref name)"
        raise LayoutError(f"{root}: expected {want}, found {len(manifests)}; refs: {names}")
    mdesc = manifests[0]
    if mdesc.get("mediaType") != MANIFEST_MEDIA_TYPE:
        raise LayoutError(f"{mdesc.get('digest')}: media type {mdesc.get('mediaType')!r} is not an OCI image manifest")

    raw_manifest = _read_verified(root, mdesc)
    manifest = _load_json(raw_manifest, f"manifest {mdesc['digest']}")
    cdesc = manifest.get("config") or {}
    if cdesc.get("mediaType") != CONFIG_MEDIA_TYPE:
        raise LayoutError(
            f"manifest {mdesc['digest']}: config media type {cdesc.get('mediaType')!r} is not an image config"
        )
    raw_config = _read_verified(root, cdesc)
    config = _load_json(raw_config, f"config {cdesc['digest']}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    ldescs = manifest.get("layers") or []
    if len(diff_ids) != len(ldescs):
        raise LayoutError(
            f"manifest {mdesc['digest']} lists {len(ldescs)} layers but its config {len(diff_ids)} diff_ids"
        )

    layers: list[Layer] = []
    for ldesc, diff_id in zip(ldescs, diff_ids, strict=True):
        layer = Layer(
            path=_blob_path(root, str(ldesc.get("digest", ""))),
            digest=str(ldesc["digest"]),
            size=int(ldesc["size"]),
            diff_id=str(diff_id),
            media_type=str(ldesc.get("mediaType", "")),
        )
        _verify_file(layer.path, layer.digest, layer.size)
        if check_diff_ids:
            layer.verify_diff_id()
        layers.append(layer)

    config_file = {k: v for k, v in config.items() if k != "rootfs"}
    return Image(
        config_file=config_file,
        layers=tuple(layers),
        annotations=dict(manifest.get("annotations") or {}),
        raw_config=raw_config,
        raw_manifest=raw_manifest,
    )


def read_config(root: str | os.PathLike[str], ref_name: str) -> tuple[str, dict[str, Any]]:
    """(config digest = Docker's image ID, config JSON) of image `ref_name`: manifest and config
    verified, layers not read (cheap)."""
    root = Path(root)
    index = _load_json(_read_index(root), "index.json")
    found = [m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(REF_NAME) == ref_name]
    if not found:
        raise LayoutError(f"{root}: no image named {ref_name!r}")
    manifest = _load_json(_read_verified(root, found[0]), f"manifest {found[0].get('digest')}")
    descriptor = manifest.get("config") or {}
    return str(descriptor.get("digest")), _load_json(_read_verified(root, descriptor), "config")


# -- by-digest access for copies (registry/copy.py): any manifest or blob, named or not ------------


def blob_path(root: str | os.PathLike[str], digest: str) -> Path:
    """Where the layout at `root` keeps blob `digest` (``blobs/sha256/<hex>``); it may not exist. Not verified."""
    return _blob_path(Path(root), digest)


def read_blob(root: str | os.PathLike[str], digest: str, size: int | None = None) -> bytes:
    """The bytes of blob `digest` (a manifest, a config: something small), verified against `digest`
    and `size` when given; BlobVerificationError when missing or different."""
    root = Path(root)
    if size is None:
        path = _blob_path(root, digest)
        if not path.is_file():
            raise BlobVerificationError(f"blob {digest} is missing: {path} does not exist")
        size = path.stat().st_size
    return _read_verified(root, {"digest": digest, "size": size})


def write_blob(root: str | os.PathLike[str], data: bytes) -> str:
    """Store `data` as a blob (atomically; kept when already there); its digest. Names nothing."""
    root = Path(root)
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    digest = sha256_digest(data)
    _put_blob_bytes(root, digest, data)
    return digest


def name_manifest(root: str | os.PathLike[str], descriptor: dict[str, Any], ref_name: str) -> dict[str, Any]:
    """Point `ref_name` in index.json at the manifest `descriptor` describes (its blob must already be
    written); an older entry of that name is replaced. Returns the index entry."""
    return _name_manifest(Path(root), descriptor, ref_name)


def index_entries(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The descriptors of index.json ([] when `root` holds no layout yet)."""
    root = Path(root)
    if not (root / "index.json").is_file():
        return []
    index = _load_json(_read_index(root), "index.json")
    return [m for m in index.get("manifests", []) if isinstance(m, dict)]


def remove_ref(root: str | os.PathLike[str], ref_name: str) -> bool:
    """Drop `ref_name` from index.json; False when it was not there. Blobs stay (nothing is
    garbage-collected here)."""
    root = Path(root)
    if not (root / "index.json").is_file():
        return False
    index = _load_json(_read_index(root), "index.json")
    manifests = index.get("manifests", [])
    kept = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) != ref_name]
    if len(kept) == len(manifests):
        return False
    index["manifests"] = kept
    _write_atomic(root / "index.json", canonical_json(index))
    return True
