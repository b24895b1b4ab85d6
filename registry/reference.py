"""Image references: ``registry.internal:5000/llm/starcoder2:1.0.0``, ``...@sha256:<hex>``, and
``oci-layout:/path/to/dir[:REF]`` for an OCI image layout directory.

Registry references follow Docker's grammar (distribution ``reference/regexp.go``): the first
``/``-separated component is the registry when it contains a ``.`` or a ``:`` or is ``localhost``;
repository components are lowercase ``[a-z0-9]`` runs joined by ``.``, ``_``, ``__`` or dashes; a tag
is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; a digest is ``sha256:`` and 64 lowercase hex digits (the only
algorithm llmctl reads). llmctl talks only to registries it is told about, so a reference without a
registry is refused unless the caller supplies `default_registry` (no silent ``docker.io``).

Layout references are skopeo's ``oci:PATH:REF`` form under the prefix ``oci-layout:``: the path is
everything up to the first ``:`` after the prefix, the rest is the layout's ref name (the
``org.opencontainers.image.ref.name`` annotation, for llmctl ``REPO:TAG`` such as
``llmctl/demo:1.0.0``, so it may itself contain ``/`` and ``:``). A path that contains ``:`` cannot be
written this way (as with skopeo); use a symlink. ``oci-layout:/srv/images`` names the whole layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from registry.errors import InvalidReferenceError

LAYOUT_PREFIX = "oci-layout:"

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
REGISTRY_RE = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_NAME = 255


def check_repository(repository: str) -> str:
    """`repository` if it is a valid repository path (``llm/starcoder2``), else InvalidReferenceError."""
    if not REPOSITORY_RE.fullmatch(repository) or len(repository) > MAX_NAME:
        raise InvalidReferenceError(
            f"invalid repository {repository!r}: use lowercase letters, digits and . _ - separated by /"
        )
    return repository


def check_name(name: str) -> str:
    """`name` if it is a repository, optionally behind its registry (``reg.internal:5000/llm/demo``):
    what an OCI layout of llmctl's uses as the repository part of its ref names."""
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not REGISTRY_RE.fullmatch(first):
            raise InvalidReferenceError(f"invalid name {name!r}: {first!r} is not a host[:port]")
        check_repository(rest)
    else:
        check_repository(name)
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise InvalidReferenceError(f"invalid tag {tag!r}: up to 128 of A-Z a-z 0-9 _ . - (not starting with . or -)")
    return tag


def check_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise InvalidReferenceError(f"invalid digest {digest!r}: expected sha256: and 64 lowercase hex digits")
    return digest


def is_digest(ref: str) -> bool:
    return DIGEST_RE.fullmatch(ref) is not None


@dataclass(frozen=True)
class Reference:
    """An image in a registry: ``registry/repository[:tag][@digest]``. A digest, when present, wins."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``: what a cosign signature's ``docker-reference`` names."""
        return f"{self.registry}/{self.repository}"

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest, else the tag, else ``latest``."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        return replace(self, tag=check_tag(tag), digest=None)

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=check_digest(digest))

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.name}{tag}{digest}"


@dataclass(frozen=True)
class LayoutReference:
    """An OCI image layout directory and, optionally, one ref name in it."""

    path: Path
    ref_name: str | None = None

    @property
    def repository(self) -> str | None:
        """``llmctl/demo`` of ref name ``llmctl/demo:1.0.0`` (None when there is no ref name)."""
        return None if self.ref_name is None else split_ref_name(self.ref_name)[0]

    @property
    def tag(self) -> str | None:
        """``1.0.0`` of ``llmctl/demo:1.0.0`` (a digest for ``llmctl/demo@sha256:...``; None if neither)."""
        return None if self.ref_name is None else split_ref_name(self.ref_name)[1]

    def __str__(self) -> str:
        return f"{LAYOUT_PREFIX}{self.path}" + (f":{self.ref_name}" if self.ref_name else "")


def split_ref_name(ref_name: str) -> tuple[str, str | None]:
    """A layout ref name ``REPO:TAG`` or ``REPO@DIGEST`` -> (REPO, TAG or DIGEST); a bare ``REPO`` -> (REPO, None).

    The tag starts at the last ``:`` after the last ``/``, so ``host:5000/repo`` keeps its port."""
    name, at, digest = ref_name.partition("@")
    if at:
        return name, digest
    slash, colon = ref_name.rfind("/"), ref_name.rfind(":")
    if colon > slash:
        return ref_name[:colon], ref_name[colon + 1 :]
    return ref_name, None


def _parse_layout(s: str) -> LayoutReference:
    rest = s[len(LAYOUT_PREFIX) :]
    path, colon, ref_name = rest.partition(":")
    if not path:
        raise InvalidReferenceError(f"invalid reference {s!r}: no directory after {LAYOUT_PREFIX!r}")
    if colon and not ref_name:
        raise InvalidReferenceError(f"invalid reference {s!r}: empty ref name after the directory")
    if ref_name and any(c.isspace() for c in ref_name):
        raise InvalidReferenceError(f"invalid reference {s!r}: the ref name contains white space")
    return LayoutReference(Path(path), ref_name or None)


def parse_remote(s: str, *, default_registry: str | None = None) -> Reference:
    """Parse ``[registry/]repository[:tag][@sha256:<hex>]``; InvalidReferenceError (one line) otherwise."""
    original = s
    if not s or any(c.isspace() for c in s):
        raise InvalidReferenceError(f"invalid reference {original!r}: empty or contains white space")
    s, at, digest = s.partition("@")
    if at:
        try:
            check_digest(digest)
        except InvalidReferenceError as e:
            raise InvalidReferenceError(f"invalid reference {original!r}: {e}") from None
    first, slash, remainder = s.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, name = first, remainder
    elif default_registry is not None:
        registry, name = default_registry, s
    else:
        raise InvalidReferenceError(
            f"invalid reference {original!r}: name the registry, e.g. registry.internal:5000/{s or 'repo'}"
        )
    if not REGISTRY_RE.fullmatch(registry):
        raise InvalidReferenceError(f"invalid reference {original!r}: {registry!r} is not a host[:port]")
    tag: str | None = None
    slash_at, colon_at = name.rfind("/"), name.rfind(":")
    if colon_at > slash_at:
        name, tag = name[:colon_at], name[colon_at + 1 :]
    try:
        check_repository(name)
        if tag is not None:
            check_tag(tag)
    except InvalidReferenceError as e:
        raise InvalidReferenceError(f"invalid reference {original!r}: {e}") from None
    if len(registry) + 1 + len(name) > MAX_NAME:
        raise InvalidReferenceError(f"invalid reference {original!r}: name longer than {MAX_NAME} characters")
    return Reference(registry, name, tag, digest or None)


def parse(s: str, *, default_registry: str | None = None) -> Reference | LayoutReference:
    """A registry reference, or a layout reference when `s` starts with ``oci-layout:``."""
    if s.startswith(LAYOUT_PREFIX):
        return _parse_layout(s)
    return parse_remote(s, default_registry=default_registry)
