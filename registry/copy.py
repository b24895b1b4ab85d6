"""Copy an image and its cosign attachments between stores: an OCI layout, a registry repository.

Copy is composition (go-containerregistry's ``remote``/``layout`` split): `copy` knows only the small
`Store` interface, implemented by `LayoutStore` (an OCI image layout directory, via
`registry.oci.layout`) and `RemoteStore` (one repository of a registry, via `RegistryClient`). A
store is scoped to one repository, so a tag means the same thing on both sides: in a layout, tag
``1.0.0`` of repository ``llmctl/demo`` is the ref name ``llmctl/demo:1.0.0``, and its signature is
``llmctl/demo:sha256-<hex>.sig``; in a registry they are tags of the store's repository. Copying to
another repository (or another layout prefix) therefore renames the repository part and keeps the tags.

What is copied, children first so a manifest never names something the destination lacks:

1. the manifest named by `src_ref` and, recursively, what it references: an index's manifests, an
   image manifest's config and layers (an OCI 1.1 artifact manifest's ``blobs``); blobs the
   destination has are skipped, blobs of another repository of the same registry are mounted;
2. unless ``attachments=False``, the cosign attachments of the top-level digest, tags
   ``sha256-<hex>.sig``, ``.att`` and ``.sbom``, each a manifest copied like the image (an attachment
   tag the destination has with other content is replaced: a mirror shows the source's signatures);
3. the image's referrers: the fallback index at tag ``sha256-<hex>`` is copied as it is when the
   destination has none (or the same one); otherwise the referrers are copied and merged into the
   destination's referrers (its own index, or nothing to do for a registry with the referrers API).

Bytes are copied verbatim, so every digest is unchanged end to end; each manifest is checked against
its digest when read, each blob while it streams (and again by the destination's hashing writer).
Attachments of the children of an index are not copied (cosign signs the digest it is given).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from registry.attachments import ATT, SBOM, SIG, attachment_tag
from registry.distribution import (
    DOCKER_MANIFEST,
    INDEX_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    READ_CHUNK,
    BlobSource,
    Readable,
    RegistryClient,
    VerifyingReader,
    index_manifest,
    json_object,
    referrers_tag,
)
from registry.errors import ManifestFormatError, ManifestUnknownError, RegistryError
from registry.oci import layout
from registry.oci.errors import BlobVerificationError
from registry.reference import check_digest, check_name, check_repository, check_tag, is_digest

OCI_ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"  # OCI 1.1 drafts; read, never made
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
EXISTS, MOUNTED, UPLOADED = "exists", "mounted", "uploaded"

Progress = Callable[[str, int, int], None]  # (digest, bytes done, bytes total)


class Store(Protocol):
    """One repository's worth of manifests, blobs and tags. Errors are `RegistryError`s."""

    def resolve(self, ref: str) -> str | None:
        """The manifest digest a tag (or a digest) names here; None when there is no such manifest."""
        ...

    def get_manifest(self, digest: str) -> tuple[bytes, str]:
        """(bytes, media type) of manifest `digest`, verified against it."""
        ...

    def has_manifest(self, digest: str) -> bool: ...

    def put_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> str:
        """Store a manifest (its blobs and children must be there), named `tag` when given; its digest."""
        ...

    def has_blob(self, digest: str) -> bool: ...

    def open_blob(self, digest: str, size: int) -> AbstractContextManager[Readable]:
        """A reader of the blob that raises `BlobVerificationError` at its end unless digest and size match."""
        ...

    def get_blob(self, digest: str, size: int) -> bytes:
        """A small blob's verified bytes."""
        ...

    def blob_file(self, digest: str) -> Path | None:
        """A local file holding the blob, when the store keeps blobs as files (not verified here)."""
        ...

    def put_blob(
        self,
        digest: str,
        size: int,
        source: BlobSource,
        *,
        mount_from: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Store a blob, hashing it on the way and refusing a source that does not match `digest`:
        "exists", "mounted" or "uploaded"."""
        ...

    def mount_source(self, other: Store) -> str | None:
        """The repository to mount `other`'s blobs from, when both are on the same registry."""
        ...

    def mount_blob(self, digest: str, from_repository: str) -> bool: ...

    def tags(self) -> list[str]: ...

    def referrers(self, digest: str) -> list[dict[str, Any]]:
        """Descriptors of the manifests whose subject is `digest`."""
        ...

    def add_referrers(self, subject: str, descriptors: Sequence[Mapping[str, Any]]) -> None:
        """Make `descriptors` (manifests already stored here) findable as referrers of `subject`."""
        ...


def _guess_media_type(doc: Mapping[str, Any]) -> str:
    if doc.get("mediaType"):
        return str(doc["mediaType"])
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def _file_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(READ_CHUNK):
        yield chunk


# -- an OCI image layout --------------------------------------------------------------------------


class LayoutStore:
    """Repository `repository` of the OCI image layout at `root` (created on the first write).

    `repository` is the ref names' prefix: ``llmctl/demo``, or with a registry, as llmctl names pulled
    images, ``reg.internal:5000/llm/demo``. Tag ``1.0.0`` is the ref name ``<repository>:1.0.0``; a
    manifest stored under a digest "tag" is named ``<repository>@sha256:<hex>`` (so a pull by digest
    stays reachable). Manifests and blobs are shared by all repositories of the layout. `has_blob`
    trusts a present file (writes are atomic); every read verifies.
    """

    def __init__(self, root: Path, repository: str) -> None:
        self.root = Path(root)
        self.repository = check_name(repository)

    def __str__(self) -> str:
        return f"oci-layout:{self.root}:{self.repository}"

    def _ref_name(self, tag: str) -> str:
        return f"{self.repository}@{tag}" if is_digest(tag) else f"{self.repository}:{check_tag(tag)}"

    def resolve(self, ref: str) -> str | None:
        if is_digest(ref):
            return ref if self.has_manifest(ref) else None
        name = self._ref_name(ref)
        for entry in layout.index_entries(self.root):
            if (entry.get("annotations") or {}).get(layout.REF_NAME) == name:
                return str(entry["digest"])
        return None

    def get_manifest(self, digest: str) -> tuple[bytes, str]:
        path = layout.blob_path(self.root, check_digest(digest))
        if path.is_file() and path.stat().st_size > MAX_MANIFEST_SIZE:
            raise ManifestFormatError(f"{self}: manifest {digest} is larger than {MAX_MANIFEST_SIZE} bytes")
        data = layout.read_blob(self.root, digest)
        doc = json_object(data, f"{self}: manifest {digest}")
        media_type = doc.get("mediaType")
        if not media_type:
            listed = [e for e in layout.index_entries(self.root) if e.get("digest") == digest]
            media_type = listed[0].get("mediaType") if listed else _guess_media_type(doc)
        return data, str(media_type)

    def has_manifest(self, digest: str) -> bool:
        return layout.blob_path(self.root, check_digest(digest)).is_file()

    def put_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> str:
        digest = layout.write_blob(self.root, data)
        if tag is not None:
            layout.name_manifest(
                self.root, {"mediaType": media_type, "digest": digest, "size": len(data)}, self._ref_name(tag)
            )
        return digest

    def has_blob(self, digest: str) -> bool:
        return layout.blob_path(self.root, check_digest(digest)).is_file()

    @contextmanager
    def open_blob(self, digest: str, size: int) -> Iterator[Readable]:
        path = layout.blob_path(self.root, check_digest(digest))
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise BlobVerificationError(f"{self}: blob {digest} is missing ({path} does not exist)") from None
        try:
            yield VerifyingReader(_file_chunks(f), digest, size, f"{self}: {path}")
        finally:
            f.close()

    def get_blob(self, digest: str, size: int) -> bytes:
        return layout.read_blob(self.root, check_digest(digest), size)

    def blob_file(self, digest: str) -> Path | None:
        path = layout.blob_path(self.root, check_digest(digest))
        return path if path.is_file() else None

    def put_blob(
        self,
        digest: str,
        size: int,
        source: BlobSource,
        *,
        mount_from: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Write the blob through a temporary file that is renamed only when its sha256 and size match."""
        path = layout.blob_path(self.root, check_digest(digest))
        if path.is_file() and path.stat().st_size == size:
            return EXISTS
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        sha, written = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in _source_chunks(source):
                    written += len(chunk)
                    if written > size:
                        break
                    sha.update(chunk)
                    out.write(chunk)
                    if progress:
                        progress(written)
            got = f"sha256:{sha.hexdigest()}"
            if got != digest or written != size:
                raise BlobVerificationError(
                    f"{self}: blob {digest} ({size} bytes) came with digest {got} ({written} bytes or more); "
                    "refused, nothing written"
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return UPLOADED

    def mount_source(self, other: Store) -> str | None:
        return None

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        return False

    def untag(self, tag: str) -> bool:
        """Remove the name `tag` (or ``@digest``) from the layout's index; blobs stay. False if absent."""
        return layout.remove_ref(self.root, self._ref_name(tag))

    def tags(self) -> list[str]:
        prefix = f"{self.repository}:"
        return [
            name[len(prefix) :]
            for name in (
                str((e.get("annotations") or {}).get(layout.REF_NAME, "")) for e in layout.index_entries(self.root)
            )
            if name.startswith(prefix) and "/" not in name[len(prefix) :]
        ]

    def _fallback_index(self, subject: str) -> list[dict[str, Any]]:
        digest = self.resolve(referrers_tag(subject))
        if digest is None:
            return []
        data, _ = self.get_manifest(digest)
        return [
            dict(m) for m in json_object(data, f"{self}: referrers index").get("manifests") or [] if isinstance(m, dict)
        ]

    def referrers(self, digest: str) -> list[dict[str, Any]]:
        return self._fallback_index(digest)

    def add_referrers(self, subject: str, descriptors: Sequence[Mapping[str, Any]]) -> None:
        current = self._fallback_index(subject)
        known = {m.get("digest") for m in current}
        new = [dict(d) for d in descriptors if d.get("digest") not in known]
        if new:
            self.put_manifest(index_manifest([*current, *new]), OCI_INDEX, referrers_tag(subject))


def _source_chunks(source: BlobSource) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield source
    elif isinstance(source, Path):
        with open(source, "rb") as f:
            yield from _file_chunks(f)  # type: ignore[arg-type]
    else:
        while chunk := source.read(READ_CHUNK):
            yield chunk


# -- a registry repository ------------------------------------------------------------------------


class RemoteStore:
    """Repository `repository` of the registry `client` talks to."""

    def __init__(self, client: RegistryClient, repository: str) -> None:
        self.client = client
        self.repository = check_repository(repository)

    def __str__(self) -> str:
        return f"{self.client.registry}/{self.repository}"

    def resolve(self, ref: str) -> str | None:
        return self.client.head_manifest(self.repository, ref)

    def get_manifest(self, digest: str) -> tuple[bytes, str]:
        data, media_type, _ = self.client.get_manifest(self.repository, check_digest(digest))
        return data, media_type

    def has_manifest(self, digest: str) -> bool:
        return self.client.head_manifest(self.repository, check_digest(digest)) is not None

    def put_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> str:
        reference = tag if tag is not None else "sha256:" + hashlib.sha256(data).hexdigest()
        return self.client.put_manifest(self.repository, reference, data, media_type)

    def has_blob(self, digest: str) -> bool:
        return self.client.blob_exists(self.repository, digest)

    def open_blob(self, digest: str, size: int) -> AbstractContextManager[Readable]:
        return self.client.open_blob(self.repository, digest, size)

    def get_blob(self, digest: str, size: int) -> bytes:
        data = self.client.get_blob(self.repository, digest, size=size)
        assert isinstance(data, bytes)
        return data

    def blob_file(self, digest: str) -> Path | None:
        return None

    def put_blob(
        self,
        digest: str,
        size: int,
        source: BlobSource,
        *,
        mount_from: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        return self.client.push_blob(self.repository, digest, size, source, mount_from=mount_from, progress=progress)

    def mount_source(self, other: Store) -> str | None:
        if isinstance(other, RemoteStore) and other.client.base_url == self.client.base_url:
            return other.repository if other.repository != self.repository else None
        return None

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        return self.client.mount_blob(self.repository, digest, from_repository)

    def tags(self) -> list[str]:
        return self.client.list_tags(self.repository)

    def referrers(self, digest: str) -> list[dict[str, Any]]:
        return self.client.referrers(self.repository, digest)

    def add_referrers(self, subject: str, descriptors: Sequence[Mapping[str, Any]]) -> None:
        if self.client.supports_referrers_api(self.repository, subject):
            return  # the registry indexes manifests with a subject itself
        for descriptor in descriptors:
            self.client.add_referrer(self.repository, subject, descriptor)


# -- copy -----------------------------------------------------------------------------------------


@dataclass
class CopyResult:
    """What a copy did: the top-level digest, blob counts, and the attachment tags and referrers copied."""

    digest: str
    blobs_copied: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0
    attachments: list[str] = field(default_factory=list)
    referrers: list[str] = field(default_factory=list)


class _Copier:
    def __init__(self, src: Store, dst: Store, progress: Progress | None) -> None:
        self.src = src
        self.dst = dst
        self.progress = progress
        self.mount_from = dst.mount_source(src)
        self.done: set[str] = set()  # digests (blobs and manifests) already at the destination
        self.result = CopyResult(digest="")

    def blob(self, descriptor: Mapping[str, Any], where: str) -> None:
        digest, size = str(descriptor.get("digest", "")), descriptor.get("size")
        if not is_digest(digest) or not isinstance(size, int) or size < 0:
            raise ManifestFormatError(f"{where}: a descriptor has no valid sha256 digest and size: {dict(descriptor)}")
        if digest in self.done:
            return
        if self.dst.has_blob(digest):
            self.result.blobs_skipped += 1
        elif self.mount_from and self.dst.mount_blob(digest, self.mount_from):
            self.result.blobs_mounted += 1
        else:
            report = _reporter(self.progress, digest, size)
            local = self.src.blob_file(digest)
            if local is not None:
                outcome = self.dst.put_blob(digest, size, local, progress=report)
            else:
                with self.src.open_blob(digest, size) as reader:
                    outcome = self.dst.put_blob(digest, size, reader, progress=report)
            if outcome == EXISTS:
                self.result.blobs_skipped += 1
            else:
                self.result.blobs_copied += 1
        self.done.add(digest)

    def manifest(self, digest: str, tag: str | None, size: int | None = None) -> str:
        """Copy manifest `digest` and everything it references; name it `tag` at the destination."""
        if digest in self.done and tag is None:
            return digest
        if tag is None and self.dst.has_manifest(digest):
            self.done.add(digest)
            return digest
        data, media_type = self.src.get_manifest(digest)
        where = f"{self.src}: manifest {digest}"
        if size is not None and len(data) != size:
            raise BlobVerificationError(f"{where} has {len(data)} bytes, its descriptor says {size}")
        if media_type in DOCKER_SCHEMA1:
            raise ManifestFormatError(f"{where} is a Docker schema 1 manifest; llmctl copies only schema 2 and OCI")
        doc = json_object(data, where)
        if media_type in INDEX_MEDIA_TYPES:
            for child in doc.get("manifests") or []:
                if not isinstance(child, dict) or not is_digest(str(child.get("digest", ""))):
                    raise ManifestFormatError(f"{where}: an entry of 'manifests' is not a descriptor")
                self.manifest(str(child["digest"]), None, child.get("size"))
        elif media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
            if isinstance(doc.get("config"), dict):
                self.blob(doc["config"], where)
            for layer in doc.get("layers") or []:
                self.blob(layer, where)
        elif media_type == OCI_ARTIFACT_MANIFEST:
            for blob in doc.get("blobs") or []:
                self.blob(blob, where)
        else:
            raise ManifestFormatError(f"{where} has media type {media_type!r}, which llmctl does not copy")
        put = self.dst.put_manifest(data, media_type, tag)
        if put != digest:
            raise BlobVerificationError(f"{self.dst}: manifest {digest} was stored as {put}")
        self.done.add(digest)
        return digest

    def attachments(self, subject: str) -> None:
        for kind in (SIG, ATT, SBOM):
            tag = attachment_tag(subject, kind)
            digest = self.src.resolve(tag)
            if digest is not None:
                self.manifest(digest, tag)
                self.result.attachments.append(tag)

    def referrers(self, subject: str) -> None:
        tag = referrers_tag(subject)
        index = self.src.resolve(tag)
        if index is not None and self.dst.resolve(tag) in (None, index):
            self.manifest(index, tag)  # the fallback index itself, byte for byte, with its referrers
            self.result.attachments.append(tag)
            return
        descriptors = self.src.referrers(subject)
        for descriptor in descriptors:
            self.manifest(str(descriptor.get("digest", "")), None, descriptor.get("size"))
        if descriptors:
            self.dst.add_referrers(subject, descriptors)
            self.result.referrers += [str(d["digest"]) for d in descriptors]


def _reporter(progress: Progress | None, digest: str, size: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    return lambda done: progress(digest, done, size)


def copy(
    src: Store,
    src_ref: str,
    dst: Store,
    dst_ref: str | None = None,
    *,
    attachments: bool = True,
    progress: Progress | None = None,
) -> CopyResult:
    """Copy the manifest `src_ref` (a tag or digest in `src`) with everything it references to `dst`,
    tagged `dst_ref` (default `src_ref`; a digest stores it by digest: in a layout, named
    ``<repository>@<digest>``), then its cosign attachments and referrers. Returns what was done; the
    digest is the same at both ends.

    Raises ManifestUnknownError when `src` has no `src_ref`, BlobVerificationError when anything read
    does not match its digest (nothing unverified is committed at the destination), and the stores'
    other RegistryErrors."""
    digest = src.resolve(src_ref)
    if digest is None:
        raise ManifestUnknownError(f"{src} has no manifest {src_ref!r}", status=404, code="MANIFEST_UNKNOWN")
    if dst_ref is None:
        dst_ref = src_ref  # a tag stays the tag; a digest names the copy by digest
    if is_digest(dst_ref) and dst_ref != digest:
        raise RegistryError(f"cannot copy {src}@{digest} to digest {dst_ref}: a copy keeps the digest")
    copier = _Copier(src, dst, progress)
    copier.result.digest = copier.manifest(digest, dst_ref)
    if attachments:
        copier.attachments(digest)
        copier.referrers(digest)
    return copier.result
