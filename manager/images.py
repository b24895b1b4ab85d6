"""The local image store: one OCI image layout under the data dir holding every built image and its
cosign attachments (``REPO:sha256-<hex>.sig|.att|.sbom``), the way a registry would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from manager import paths
from manager.errors import LlmctlError
from registry.attachments import attachment_tag
from registry.oci.artifact import Attachment
from registry.oci.errors import LayoutError
from registry.oci.layout import list_refs, read_attachment, read_config, resolve_ref, write_attachment


class ImageNotFoundError(LlmctlError):
    """No image of that name or digest in the local store."""


@dataclass(frozen=True)
class ImageRef:
    name: str  # the ref name in the layout, e.g. llmctl/demo:1.0.0
    repository: str  # llmctl/demo
    digest: str  # sha256:<hex> of the manifest


def layout_dir() -> Path:
    return paths.data_dir() / "images" / "layout"


def repository_of(ref_name: str) -> str:
    """`llmctl/demo:1.0.0` -> `llmctl/demo` (a ':' after the last '/' starts the tag; a registry port
    comes before a '/')."""
    slash = ref_name.rfind("/")
    colon = ref_name.rfind(":")
    return ref_name[:colon] if colon > slash else ref_name


def resolve(image: str, layout: Path | None = None) -> ImageRef:
    """`llmctl/NAME:VERSION` or `sha256:<hex>` (or `llmctl/NAME@sha256:<hex>`) -> its ref in the store."""
    layout = layout or layout_dir()
    if not (layout / "index.json").is_file():
        raise ImageNotFoundError(
            f"no image {image!r}: nothing has been built yet ({layout} is empty); run `llmctl build`"
        )
    name, _, pinned = image.partition("@")
    if image.startswith("sha256:") or pinned:
        digest = pinned or image
        names = [r for r in list_refs(layout) if ".sha256-" not in r and ":sha256-" not in r]
        for ref in names:
            if resolve_ref(layout, ref) == digest and (not pinned or repository_of(ref) == name):
                return ImageRef(ref, repository_of(ref), digest)
        raise ImageNotFoundError(f"no image with digest {digest} in {layout}; `llmctl build` it first")
    try:
        return ImageRef(image, repository_of(image), resolve_ref(layout, image))
    except LayoutError:
        raise ImageNotFoundError(f"no image {image!r} in {layout}; build it with `llmctl build`") from None


def config_labels(ref_name: str, layout: Path | None = None) -> tuple[str, dict[str, str]]:
    """(config digest = Docker's image ID, config labels) of a stored image; its layers are not read."""
    image_id, config = read_config(layout or layout_dir(), ref_name)
    return image_id, dict((config.get("config") or {}).get("Labels") or {})


def attachment_ref(ref: ImageRef, kind: str) -> str:
    return f"{ref.repository}:{attachment_tag(ref.digest, kind)}"


def read(ref: ImageRef, kind: str, layout: Path | None = None) -> Attachment | None:
    return read_attachment(layout or layout_dir(), attachment_ref(ref, kind))


def write(ref: ImageRef, kind: str, attachment: Attachment, layout: Path | None = None) -> None:
    write_attachment(layout or layout_dir(), attachment, attachment_ref(ref, kind))
