"""Moving images, models and charts between the local store and registries (push, pull, mirror).

Everything goes through the one local OCI layout (`manager.images.layout_dir()`): a push copies
from it, a pull copies into it and then checks the trust policy; what the policy refuses is dropped
from the store again, so nothing unverified stays where an install could find it. Models travel as
CNCF ModelPack artifacts and charts as llmctl chart artifacts; both are signed like images (`.sig`)
and checked on pull against the policy's rule for their repository.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manager import audit, images, paths, policy, signing
from manager.cache import open_store
from manager.errors import LlmctlError
from manager.verify_image import Verification, verify_image
from registry import attachments, chart_artifact, modelpack
from registry.attachments import SIG
from registry.copy import CopyResult, LayoutStore, RemoteStore, copy
from registry.credentials import Credentials, CredentialStore
from registry.distribution import RegistryClient
from registry.errors import ManifestUnknownError, RegistryError
from registry.keys import fingerprint
from registry.oci.image import MANIFEST_MEDIA_TYPE
from registry.oci.layout import blob_path, name_manifest, read_blob, write_blob
from registry.reference import LayoutReference, Reference, parse, split_ref_name


class TransferError(LlmctlError):
    """A push, pull or mirror that cannot go ahead."""


@dataclass(frozen=True)
class Connection:
    """How to reach a registry: a CA bundle; no TLS verification or plain HTTP only when asked."""

    ca_file: Path | None = None
    insecure: bool = False
    plain_http: bool = False


@dataclass(frozen=True)
class Pulled:
    name: str  # the ref name in the local store, e.g. registry.internal:5000/llm/demo:1.0.0
    digest: str
    copied: CopyResult
    verification: Verification


def credentials_store() -> CredentialStore:
    return CredentialStore(paths.config_dir() / "auth.json")


def client(registry: str, conn: Connection = Connection()) -> RegistryClient:
    return RegistryClient(
        registry,
        credentials=credentials_store().get(registry),
        ca_file=conn.ca_file,
        insecure=conn.insecure,
        plain_http=conn.plain_http,
    )


def login(registry: str, username: str, password: str, conn: Connection = Connection()) -> None:
    """Check the credentials against the registry, then keep them (mode 0600)."""
    RegistryClient(
        registry,
        credentials=Credentials(username, password),
        ca_file=conn.ca_file,
        insecure=conn.insecure,
        plain_http=conn.plain_http,
    ).ping()
    credentials_store().login(registry, username, password)
    audit.record("login", registry, "ok", username=username)


def logout(registry: str) -> bool:
    return credentials_store().logout(registry)


def registry_ref(text: str) -> Reference:
    parsed = parse(text.removeprefix("oci://"))
    if isinstance(parsed, LayoutReference):
        raise TransferError(f"{text}: expected a registry reference (registry:port/repository:tag)")
    return parsed


def _remote(ref: Reference, conn: Connection) -> RemoteStore:
    return RemoteStore(client(ref.registry, conn), ref.repository)


def _tag(ref: Reference) -> str:
    return ref.digest or ref.tag or "latest"


def _audited(event: str, subject: str, work: Any, **details: Any) -> CopyResult:
    try:
        result: CopyResult = work()
    except (LlmctlError, RegistryError) as e:
        audit.record(event, subject, "failed", reason=" ".join(str(e).split()), **details)
        raise
    audit.record(event, subject, "ok", digest=result.digest, attachments=result.attachments, **details)
    return result


# --- images -----------------------------------------------------------------------------------------


def push(
    image: str, destination: str, conn: Connection = Connection(), *, policy_file: Path | None = None
) -> CopyResult:
    """Push a built image with its signature, attestations and SBOM. It must pass the trust policy
    first: a registry never receives what this machine would refuse to run."""
    ref = images.resolve(image)
    verify_image(ref.name, policy=policy.load_policy(policy_file))
    dest = registry_ref(destination)
    tag = split_ref_name(ref.name)[1] or ref.digest
    src = LayoutStore(images.layout_dir(), ref.repository)
    return _audited("push", str(dest), lambda: copy(src, tag, _remote(dest, conn), _tag(dest)), image=ref.name)


def pull(source: str, conn: Connection = Connection(), *, policy_file: Path | None = None) -> Pulled:
    """Pull an image with its attachments into the local store and check it against the trust
    policy (the rule for its repository); a refused image is dropped from the store again."""
    src = registry_ref(source)
    layout = images.layout_dir()
    layout.mkdir(parents=True, exist_ok=True)
    dst = LayoutStore(layout, src.name)
    result = _audited("pull", str(src), lambda: copy(_remote(src, conn), src.ref, dst, _tag(src)))
    name = f"{src.name}@{src.digest}" if src.digest else f"{src.name}:{_tag(src)}"
    try:
        verification = verify_image(name, policy=policy.load_policy(policy_file), enforce_policy=True)
    except (LlmctlError, RegistryError):
        dst.untag(_tag(src))
        raise
    return Pulled(name, result.digest, result, verification)


def mirror(source: str, destination: str, conn: Connection = Connection()) -> CopyResult:
    """Copy an image, model or chart with its attachments between registries, or to and from an OCI
    layout directory (`oci-layout:/path:REPO:TAG`), for a USB stick or a one-way transfer: digests
    unchanged."""
    src, dst = parse(source.removeprefix("oci://")), parse(destination.removeprefix("oci://"))

    def store_and_tag(ref: Reference | LayoutReference, fallback: Reference | LayoutReference | None) -> Any:
        if isinstance(ref, LayoutReference):
            repo, tag = ref.repository, ref.tag
            if repo is None and isinstance(fallback, Reference):  # oci-layout:/dir -> keep the source's name
                repo, tag = fallback.name, _tag(fallback)
            if repo is None or tag is None:
                raise TransferError(f"{ref}: name the image in the layout: oci-layout:/path:REPOSITORY:TAG")
            ref.path.mkdir(parents=True, exist_ok=True)
            return LayoutStore(ref.path, repo), tag
        return _remote(ref, conn), _tag(ref)

    src_store, src_tag = store_and_tag(src, None)
    dst_store, dst_tag = store_and_tag(dst, src)
    return _audited("mirror", f"{source} -> {destination}", lambda: copy(src_store, src_tag, dst_store, dst_tag))


# --- signing artifacts --------------------------------------------------------------------------------


def _sign_in_layout(repository: str, tag: str, digest: str, key: str | None) -> str | None:
    """Sign an artifact in the local store (`.sig` next to it) with the store's key; None when there
    is no key (the policy then decides whether unsigned artifacts are acceptable)."""
    key_file = signing.signing_key_file(key)
    if key_file is None:
        return None
    private = signing.load_signing_key(key_file)
    ref = images.ImageRef(f"{repository}:{tag}", repository, digest)
    images.write(ref, SIG, attachments.add(images.read(ref, SIG), attachments.sign(digest, repository, private, None)))
    return fingerprint(private)


def _check_signed(repository: str, tag: str, digest: str, policy_file: Path | None) -> str | None:
    """The policy's signature requirement for an artifact (model or chart) pulled from `repository`."""
    loaded = policy.load_policy(policy_file)
    rule = loaded.rule_for(repository)
    if not rule.require_signature:
        return None
    trusted = policy.resolve_keys(loaded, rule)
    ref = images.ImageRef(f"{repository}:{tag}", repository, digest)
    where = f"{repository}:{tag} ({digest})"
    try:
        _, key = attachments.verify_signatures(images.read(ref, SIG), trusted, digest, where)
    except (LlmctlError, RegistryError) as e:
        audit.record("policy", where, "denied", reason=" ".join(str(e).split()))
        raise
    audit.record("policy", where, "ok", signer=fingerprint(key))
    return fingerprint(key)


def _link_blob(layout: Path, source: Path, digest: str) -> None:
    """Put a big local file into the layout as a blob without a second copy when possible."""
    target = blob_path(layout, digest)
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        os.close(fd)
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def _write_artifact(repository: str, tag: str, manifest: bytes, config: bytes) -> str:
    layout = images.layout_dir()
    write_blob(layout, config)
    digest = write_blob(layout, manifest)
    descriptor = {"mediaType": MANIFEST_MEDIA_TYPE, "digest": digest, "size": len(manifest)}
    name_manifest(layout, descriptor, f"{repository}:{tag}")
    return digest


# --- models (ModelPack) -------------------------------------------------------------------------------


def model_push(
    weights: str,
    destination: str,
    card: modelpack.ModelCard,
    conn: Connection = Connection(),
    *,
    key: str | None = None,
) -> CopyResult:
    """Push a weights file (a path, or the digest of a cached blob) as a signed ModelPack artifact."""
    store = open_store()
    path = store.path(weights) if weights.startswith("sha256:") else Path(weights)
    if not path.is_file():
        raise TransferError(f"{weights}: no such weights file (a path, or a digest from `llmctl cache ls`)")
    from manager.blobstore import hash_file

    digest = "sha256:" + hash_file(path).hexdigest()
    files = [modelpack.WeightFile(f"{card.name}.gguf", digest, path.stat().st_size, path)]
    config = modelpack.config_bytes(card, files)
    dest = registry_ref(destination)
    repository, tag = f"llmctl-models/{card.name}", card.version
    _link_blob(images.layout_dir(), path, digest)
    manifest_digest = _write_artifact(repository, tag, modelpack.manifest_bytes(config, files), config)
    _sign_in_layout(repository, tag, manifest_digest, key)
    src = LayoutStore(images.layout_dir(), repository)
    return _audited("push", str(dest), lambda: copy(src, tag, _remote(dest, conn), _tag(dest)), model=card.name)


def model_pull(source: str, conn: Connection = Connection(), *, policy_file: Path | None = None) -> list[Path]:
    """Pull a ModelPack model: its signature per the policy, then each weight file into the cache
    (verified while streaming, pinned as `oci-<repository>-<tag>`). Returns the cached paths."""
    src = registry_ref(source)
    layout = images.layout_dir()
    layout.mkdir(parents=True, exist_ok=True)
    remote = _remote(src, conn)
    dst = LayoutStore(layout, src.name)
    manifest_digest = remote.resolve(src.ref)
    if manifest_digest is None:
        raise TransferError(f"{src}: not found in the registry")
    manifest, _ = remote.get_manifest(manifest_digest)
    files = modelpack.parse_manifest(manifest, str(src))
    # the manifest and signature first (small), the weights only once the signature is accepted
    c = client(src.registry, conn)
    sig_tag = attachments.attachment_tag(manifest_digest, SIG)
    try:
        copy(remote, sig_tag, dst, sig_tag, attachments=False)
    except ManifestUnknownError:
        pass  # no signature: the policy decides below
    _check_signed(src.name, _tag(src), manifest_digest, policy_file)
    store = open_store()
    out = []
    for f in files:
        if not store.has(f.digest) or not store.verify(f.digest):
            store.blob_dir.mkdir(parents=True, exist_ok=True)
            c.get_blob(src.repository, f.digest, store.partial_path(f.digest), size=f.size)
            store.commit(f.digest, source=f"oci://{src.name}@{manifest_digest} {f.name}")
        pin = f"oci-{src.repository.replace('/', '-')}-{_tag(src)}".replace(":", "-")[:100]
        store.pin(pin, f.digest)
        out.append(store.path(f.digest))
    audit.record("pull", str(src), "ok", digest=manifest_digest, files=[f.digest for f in files])
    return out


# --- charts -------------------------------------------------------------------------------------------


def chart_push(
    chart_dir: Path, destination: str, conn: Connection = Connection(), *, key: str | None = None
) -> CopyResult:
    """Package a chart reproducibly and push it as a signed artifact to `destination/NAME:VERSION`."""
    from manager import charts

    chart = charts.load_chart(chart_dir)
    meta = chart.meta
    with tempfile.TemporaryDirectory() as tmp:
        archive = charts.package(chart_dir, Path(tmp))
        data = archive.read_bytes()
    layout = images.layout_dir()
    archive_digest = write_blob(layout, data)
    package = chart_artifact.ChartPackage(meta.name, meta.version, archive_digest, len(data))
    config = chart_artifact.config_bytes(
        {
            "apiVersion": meta.api_version,
            "name": meta.name,
            "version": meta.version,
            "appVersion": meta.app_version,
            "description": meta.description,
            "keywords": list(meta.keywords),
            "license": meta.license,
        }
    )
    dest = registry_ref(destination.rstrip("/") + f"/{meta.name}:{meta.version}")
    repository = f"llmctl-charts/{meta.name}"
    digest = _write_artifact(repository, meta.version, chart_artifact.manifest_bytes(config, package), config)
    _sign_in_layout(repository, meta.version, digest, key)
    src = LayoutStore(layout, repository)
    return _audited(
        "push", str(dest), lambda: copy(src, meta.version, _remote(dest, conn), meta.version), chart=meta.name
    )


def chart_pull(
    source: str, version: str | None, conn: Connection = Connection(), *, policy_file: Path | None = None
) -> Path:
    """Pull `oci://registry/repo/NAME` (tag `version`, or the reference's own tag): the signature per
    the policy, then the archive (digest-checked) into the chart cache. Returns the `.tgz` path."""
    src = registry_ref(source)
    if version:
        src = src.with_tag(version)
    layout = images.layout_dir()
    layout.mkdir(parents=True, exist_ok=True)
    dst = LayoutStore(layout, src.name)
    result = _audited("pull", str(src), lambda: copy(_remote(src, conn), src.ref, dst, _tag(src)))
    try:
        _check_signed(src.name, _tag(src), result.digest, policy_file)
        manifest = read_blob(layout, result.digest)
        _, layer = chart_artifact.parse_manifest(manifest, str(src))
    except (LlmctlError, RegistryError):
        dst.untag(_tag(src))
        raise
    out = paths.cache_dir() / "charts" / "oci" / f"{layer['digest'].split(':', 1)[1]}.tgz"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    shutil.copyfile(blob_path(layout, str(layer["digest"])), tmp)
    os.replace(tmp, out)
    return out
