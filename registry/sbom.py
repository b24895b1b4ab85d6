"""CycloneDX 1.6 JSON SBOMs (ML-BOM) for llmctl's model images, as plain dicts.

One document per image: the image is `metadata.component`; the model (with the SHA-256 of every weight
file, its licence and a model card), the datasets it was trained on, the runtime, every installed Debian
package and every Python distribution are `components`; `dependencies` link the image to its parts.

The output is deterministic: the same inputs (including the timestamp) give byte-identical JSON from
`sbom_json`, and the `serialNumber` is a UUIDv5 of the rest of the document. docs/sbom.md describes it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from registry.errors import RegistryError

SPEC_VERSION = "1.6"
SCHEMA_URL = "http://cyclonedx.org/schema/bom-1.6.schema.json"
BIGCODE_LICENSE = "bigcode-openrail-m"
BIGCODE_LICENSE_URL = "https://huggingface.co/spaces/bigcode/bigcode-model-license-agreement"
# GGUF general.architecture -> the Hugging Face class name a reader will recognise
MODEL_ARCHITECTURES = {"starcoder2": "Starcoder2ForCausalLM", "starcoder": "GPTBigCodeForCausalLM"}
_SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/llmctl/llmctl/sbom")

Json = dict[str, Any]


class SbomError(RegistryError):
    """An SBOM cannot be built from the given inputs; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class WeightFile:
    path: str  # where the file lives in the image, e.g. /models/model.gguf
    sha256: str  # 64 lower-case hex digits
    size: int


@dataclass(frozen=True)
class ModelInfo:
    name: str  # e.g. starcoder2-3b
    version: str  # the chart's model version or the quantization, e.g. Q4_0
    architecture: str  # GGUF general.architecture: starcoder2 | starcoder
    context_length: int
    quantization: str  # e.g. Q4_0, Q8_0, F16
    license: str = BIGCODE_LICENSE  # written as a named licence: OpenRAIL has no SPDX id
    license_url: str | None = BIGCODE_LICENSE_URL
    datasets: tuple[str, ...] = ()  # e.g. ("bigcode/the-stack-v2",)
    model_card_url: str | None = None


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    architecture: str


# --- Debian packages --------------------------------------------------------------------------------


def _stanzas(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (first line number, fields) for each RFC 822 stanza of a dpkg status file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SbomError(f"{path}: cannot read the dpkg status file: {e.strerror or e}") from e
    fields: dict[str, str] = {}
    start = 0
    last: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if fields:
                yield start, fields
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is None:
                raise SbomError(f"{path}:{lineno}: continuation line before any field; is this a dpkg status file?")
            fields[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or " " in key:
            raise SbomError(f"{path}:{lineno}: expected 'Field: value', got {line[:60]!r}; is this a dpkg status file?")
        if not fields:
            start = lineno
        last = key
        fields[key] = value.strip()
    if fields:
        yield start, fields


def parse_dpkg_status(path: Path) -> list[DebPackage]:
    """The installed packages in one dpkg status file (`Status: ... installed`; a missing Status counts)."""
    packages = []
    for lineno, fields in _stanzas(path):
        status = fields.get("Status", "install ok installed").split()
        if status[-1:] != ["installed"]:
            continue  # removed with config files left, half-installed, ...
        missing = [k for k in ("Package", "Version", "Architecture") if not fields.get(k)]
        if missing:
            raise SbomError(f"{path}:{lineno}: package stanza has no {', '.join(missing)} field")
        packages.append(DebPackage(fields["Package"], fields["Version"], fields["Architecture"]))
    return packages


def debian_packages(rootfs: Path) -> list[DebPackage]:
    """Installed packages of a root filesystem: var/lib/dpkg/status plus status.d/* (distroless layouts)."""
    dpkg = rootfs / "var/lib/dpkg"
    files = [dpkg / "status"] if (dpkg / "status").is_file() else []
    if (dpkg / "status.d").is_dir():
        files += sorted(p for p in (dpkg / "status.d").iterdir() if p.is_file() and not p.name.endswith(".md5sums"))
    found: dict[tuple[str, str], DebPackage] = {}
    for f in files:
        for pkg in parse_dpkg_status(f):
            found[(pkg.name, pkg.architecture)] = pkg
    return list(found.values())


def _purl_part(s: str) -> str:
    return quote(s, safe=".-_~")


def deb_component(pkg: DebPackage) -> Json:
    purl = f"pkg:deb/debian/{_purl_part(pkg.name)}@{_purl_part(pkg.version)}?arch={_purl_part(pkg.architecture)}"
    # dpkg keeps only per-file MD5s (info/*.md5sums), no package digest: record no hash rather than invent one
    return {"type": "library", "bom-ref": purl, "name": pkg.name, "version": pkg.version, "purl": purl}


# --- Python distributions ---------------------------------------------------------------------------


def pypi_name(name: str) -> str:
    """PEP 503 normalisation, which is also the purl spec's form for pypi names."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pypi_purl(name: str, version: str) -> str:
    return f"pkg:pypi/{_purl_part(pypi_name(name))}@{_purl_part(version)}"


def _record_digest(dist: importlib.metadata.Distribution) -> str | None:
    for f in dist.files or ():
        if f.name == "RECORD" and f.parent.name.endswith(".dist-info"):
            try:
                return hashlib.sha256(Path(str(dist.locate_file(f))).read_bytes()).hexdigest()
            except OSError:
                return None
    return None


def python_component(dist: importlib.metadata.Distribution) -> Json | None:
    """A `library` component for one installed distribution; None if its metadata has no name."""
    name = dist.metadata["Name"] if dist.metadata else None
    if not name:
        return None
    purl = pypi_purl(name, dist.version)
    comp: Json = {"type": "library", "bom-ref": purl, "name": name, "version": dist.version, "purl": purl}
    digest = _record_digest(dist)
    if digest:
        # RECORD lists the sha256 of every installed file, so its own digest pins the installed files
        comp["hashes"] = [{"alg": "SHA-256", "content": digest}]
        comp["properties"] = [{"name": "llmctl:hash-of", "value": "dist-info/RECORD"}]
    return comp


def python_components(site_packages: Iterable[Path]) -> list[Json]:
    found: dict[str, Json] = {}
    for sp in site_packages:
        if not sp.is_dir():
            raise SbomError(f"{sp}: site-packages directory does not exist")
        for dist in importlib.metadata.distributions(path=[str(sp)]):
            comp = python_component(dist)
            if comp is not None:
                found.setdefault(comp["bom-ref"], comp)
    return list(found.values())


# --- the model --------------------------------------------------------------------------------------


def _license(model: ModelInfo) -> list[Json]:
    lic: Json = {"name": model.license}
    if model.license_url:
        lic["url"] = model.license_url
    return [{"license": lic}]


def dataset_component(name: str) -> Json:
    return {
        "type": "data",
        "bom-ref": f"data:{name}",
        "name": name,
        "data": [{"type": "dataset", "name": name}],
    }


def model_ref(model: ModelInfo) -> str:
    return f"model:{model.name}@{model.version}"


def model_component(model: ModelInfo, weights: list[WeightFile]) -> Json:
    if not weights:
        raise SbomError(f"model {model.name}: no weight files given; an SBOM must pin the weights")
    for w in weights:
        if not re.fullmatch(r"[0-9a-f]{64}", w.sha256):
            raise SbomError(f"weight file {w.path}: sha256 must be 64 lower-case hex digits, got {w.sha256!r}")
    files = sorted(weights, key=lambda w: w.path)
    dup = sorted({a.path for a, b in zip(files, files[1:], strict=False) if a.path == b.path})
    if dup:
        raise SbomError(f"model {model.name}: weight file {dup[0]} is listed twice")
    card: Json = {
        "modelParameters": {
            "approach": {"type": "self-supervised"},
            "task": "text-generation",
            "architectureFamily": "transformer",
            "modelArchitecture": MODEL_ARCHITECTURES.get(model.architecture, model.architecture),
            "datasets": [{"ref": f"data:{d}"} for d in sorted(set(model.datasets))],
            "inputs": [{"format": "text"}],
            "outputs": [{"format": "text"}],
        },
        "considerations": {"useCases": ["code completion, including fill-in-the-middle"]},
    }
    comp: Json = {
        "type": "machine-learning-model",
        "bom-ref": model_ref(model),
        "name": model.name,
        "version": model.version,
        "hashes": [{"alg": "SHA-256", "content": w.sha256} for w in files],
        "licenses": _license(model),
        "modelCard": card,
        "properties": _properties(
            {
                "llmctl:architecture": model.architecture,
                "llmctl:context-length": str(model.context_length),
                "llmctl:quantization": model.quantization,
                "llmctl:file-format": "GGUF",
            }
        ),
        # one `file` per weight file, so that a verifier can match each digest to its path in the image
        "components": [
            {
                "type": "file",
                "bom-ref": f"{model_ref(model)}#{w.path}",
                "name": w.path,
                "hashes": [{"alg": "SHA-256", "content": w.sha256}],
                "properties": _properties({"llmctl:size": str(w.size)}),
            }
            for w in files
        ],
    }
    if model.model_card_url:
        comp["externalReferences"] = [{"type": "model-card", "url": model.model_card_url}]
    return comp


def _properties(props: dict[str, str]) -> list[Json]:
    return [{"name": k, "value": v} for k, v in sorted(props.items())]


# --- the document -----------------------------------------------------------------------------------


def default_timestamp() -> datetime:
    """SOURCE_DATE_EPOCH if set (reproducible builds), else now."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde is None:
        return datetime.now(UTC)
    try:
        return datetime.fromtimestamp(int(sde), UTC)
    except (ValueError, OverflowError, OSError) as e:
        raise SbomError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {sde!r}") from e


def tool_version() -> str:
    """The installed llmctl distribution's version, or ``0+unknown`` in an uninstalled tree."""
    try:
        return importlib.metadata.version("llmctl")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_sbom(
    *,
    image_name: str,
    image_version: str,
    model: ModelInfo,
    weights: list[WeightFile],
    rootfs: Path | None,
    site_packages: list[Path],
    runtime_version: str,
    timestamp: datetime | None = None,
) -> Json:
    """The CycloneDX 1.6 document for one model image (see the module docstring)."""
    ts = (timestamp or default_timestamp()).astimezone(UTC).replace(microsecond=0)
    image_ref = f"image:{image_name}:{image_version}"
    runtime_purl = pypi_purl("llmctl", runtime_version)
    runtime = {
        "type": "application",
        "bom-ref": runtime_purl,
        "name": "llmctl-runtime",
        "version": runtime_version,
        "purl": runtime_purl,
        "description": "llmctl's inference runtime (python -m runtime serve)",
    }
    parts = [model_component(model, weights), runtime]
    parts += [dataset_component(d) for d in sorted(set(model.datasets))]
    if rootfs is not None:
        parts += [deb_component(p) for p in debian_packages(rootfs)]
    # the llmctl distribution in site-packages is the runtime component above
    parts += [c for c in python_components(site_packages) if c["bom-ref"] != runtime_purl]
    parts.sort(key=lambda c: (c["type"], c["bom-ref"]))
    bom: Json = {
        "$schema": SCHEMA_URL,
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "version": 1,
        "metadata": {
            "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"components": [{"type": "application", "name": "llmctl", "version": tool_version()}]},
            "component": {"type": "container", "bom-ref": image_ref, "name": image_name, "version": image_version},
        },
        "components": parts,
        "dependencies": [{"ref": image_ref, "dependsOn": [c["bom-ref"] for c in parts if c["type"] != "data"]}],
    }
    bom["serialNumber"] = f"urn:uuid:{uuid.uuid5(_SERIAL_NAMESPACE, hashlib.sha256(sbom_json(bom)).hexdigest())}"
    return bom


def sbom_json(bom: Json) -> bytes:
    """Canonical bytes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(bom, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sbom_digest(bom: Json) -> str:
    return "sha256:" + hashlib.sha256(sbom_json(bom)).hexdigest()


@dataclass(frozen=True)
class ModelClaims:
    """What an SBOM says about its model: name, version, licences and each weight file's digest."""

    name: str
    version: str
    licenses: tuple[str, ...]
    weights: tuple[WeightFile, ...]


def _sha256_of(hashes: object) -> str | None:
    for h in hashes if isinstance(hashes, list) else []:
        if isinstance(h, dict) and h.get("alg") == "SHA-256" and isinstance(h.get("content"), str):
            return str(h["content"])
    return None


def model_claims(bom: Json, where: str = "SBOM") -> ModelClaims:
    """Read the `machine-learning-model` component back (for verifiers); SbomError if it is absent or
    does not pin every weight file with a SHA-256."""
    models = [
        c for c in bom.get("components") or [] if isinstance(c, dict) and c.get("type") == "machine-learning-model"
    ]
    if len(models) != 1:
        raise SbomError(f"{where} lists {len(models)} machine-learning-model components, expected exactly one")
    model = models[0]
    licenses = tuple(
        str(entry["license"].get("name") or entry["license"].get("id"))
        for entry in model.get("licenses") or []
        if isinstance(entry, dict) and isinstance(entry.get("license"), dict)
    )
    files = []
    for f in model.get("components") or []:
        if not isinstance(f, dict) or f.get("type") != "file":
            continue
        digest = _sha256_of(f.get("hashes"))
        if digest is None or not isinstance(f.get("name"), str):
            raise SbomError(f"{where}: weight file component {f.get('bom-ref')!r} has no name or SHA-256 hash")
        size = next((p.get("value") for p in f.get("properties") or [] if p.get("name") == "llmctl:size"), "0")
        files.append(WeightFile(path=str(f["name"]), sha256=digest, size=int(size) if str(size).isdigit() else 0))
    if not files:
        raise SbomError(f"{where}: model {model.get('name')!r} pins no weight files")
    return ModelClaims(str(model.get("name")), str(model.get("version")), licenses, tuple(files))
