"""Read what a container would see at a path: the file in the topmost layer that has it.

Used by verifiers to compare a digest someone claims (an SBOM, a label) with the bytes the image
actually carries. Layers are streamed; a whiteout (``.wh.<name>``) in an upper layer hides the file.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from typing import BinaryIO

from registry.oci.errors import BlobVerificationError
from registry.oci.image import Image
from registry.oci.layer import CHUNK


def _member_key(name: str) -> str:
    return posixpath.normpath(name.lstrip("/")).removeprefix("./")


def sha256_of_file(image: Image, path: str, copy_to: BinaryIO | None = None) -> str | None:
    """``sha256:<hex>`` of the regular file at `path` as the container sees it (its bytes also
    written to `copy_to` when given); None when no layer has it (or an upper layer deletes it)."""
    want = _member_key(path)
    whiteout = posixpath.join(posixpath.dirname(want), ".wh." + posixpath.basename(want))
    for layer in reversed(image.layers):
        try:
            with tarfile.open(layer.path, mode="r|*") as tar:
                for member in tar:
                    key = _member_key(member.name)
                    if key == whiteout:
                        return None
                    if key != want:
                        continue
                    if not member.isfile():
                        return None
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file always has a body
                    sha = hashlib.sha256()
                    while chunk := f.read(CHUNK):
                        sha.update(chunk)
                        if copy_to is not None:
                            copy_to.write(chunk)
                    return f"sha256:{sha.hexdigest()}"
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BlobVerificationError(f"layer {layer.digest} is not a readable tar: {e}") from None
    return None
