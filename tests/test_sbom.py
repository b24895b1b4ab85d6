"""CycloneDX 1.6 SBOMs: valid against the official schema, deterministic, honest about what they pin."""

from __future__ import annotations

import json
import sysconfig
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from manager.sbom_model import model_info_from_gguf, weight_file
from registry.sbom import (
    BIGCODE_LICENSE_URL,
    SbomError,
    build_sbom,
    debian_packages,
    parse_dpkg_status,
    sbom_digest,
    sbom_json,
)
from runtime.testing.make_model import make_model

SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
TS = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

DPKG_STATUS = """\
Package: base-files
Essential: yes
Status: install ok installed
Priority: required
Section: admin
Installed-Size: 343
Maintainer: Santiago Vila <sanvila@debian.org>
Architecture: amd64
Multi-Arch: foreign
Version: 12.4+deb12u5
Description: Debian base system miscellaneous files
 This package contains the basic filesystem hierarchy of a Debian system, and
 several important miscellaneous files, such as /etc/debian_version,
 .
 /etc/host.conf, /etc/issue, /etc/motd, /etc/profile, and others,
 and the text of several common licenses in use on Debian systems.

Package: libc6
Status: install ok installed
Priority: optional
Section: libs
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u7
Depends: libgcc-s1
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.

Package: oldtool
Status: deinstall ok config-files
Priority: optional
Architecture: amd64
Version: 1:0.9-2
Description: removed, configuration files left behind

Package: python3.11-minimal
Status: install ok installed
Architecture: amd64
Version: 3.11.2-6+deb12u2
Description: Minimal subset of the Python language (version 3.11)
 This package contains the interpreter and some essential modules.
"""

DISTROLESS_STANZA = """\
Package: tzdata
Version: 2024a-0+deb12u1
Architecture: all
Description: time zone and daylight-saving time data
"""


@pytest.fixture(scope="module")
def validator() -> Any:
    json_validation = pytest.importorskip("cyclonedx.validation.json", reason="pip install -r requirements-dev.txt")
    from cyclonedx.schema import SchemaVersion

    return json_validation.JsonStrictValidator(SchemaVersion.V1_6)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("sbom") / "model.gguf", arch="starcoder2", wtype="q8_0")


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs")
    dpkg = root / "var/lib/dpkg"
    (dpkg / "status.d").mkdir(parents=True)
    (dpkg / "status").write_text(DPKG_STATUS)
    (dpkg / "status.d/tzdata").write_text(DISTROLESS_STANZA)
    (dpkg / "status.d/tzdata.md5sums").write_text("d41d8cd98f00b204e9800998ecf8427e  usr/share/zoneinfo/UTC\n")
    return root


def _build(gguf: Path, rootfs: Path | None, **kw: Any) -> dict[str, Any]:
    model = model_info_from_gguf(gguf, name="starcoder2-test", version="Q8_0")
    args: dict[str, Any] = {
        "image_name": "llmctl/starcoder2-test",
        "image_version": "0.1.0",
        "model": model,
        "weights": [weight_file(gguf, image_path="/models/model.gguf")],
        "rootfs": rootfs,
        "site_packages": [SITE_PACKAGES],
        "runtime_version": "0.1.0",
        "timestamp": TS,
    }
    return build_sbom(**(args | kw))


def _by_ref(bom: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["bom-ref"]: c for c in bom["components"]}


def test_full_bom_is_valid_cyclonedx_1_6(gguf: Path, rootfs: Path, validator: Any) -> None:
    bom = _build(gguf, rootfs)
    errors = validator.validate_str(sbom_json(bom).decode())
    assert errors is None, str(errors)
    assert bom["specVersion"] == "1.6"
    assert bom["metadata"]["component"] == {
        "type": "container",
        "bom-ref": "image:llmctl/starcoder2-test:0.1.0",
        "name": "llmctl/starcoder2-test",
        "version": "0.1.0",
    }
    assert bom["metadata"]["timestamp"] == "2024-05-01T12:00:00Z"
    refs = _by_ref(bom)
    debs = sorted(r for r in refs if r.startswith("pkg:deb/"))
    assert debs == [
        "pkg:deb/debian/base-files@12.4%2Bdeb12u5?arch=amd64",
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u7?arch=amd64",
        "pkg:deb/debian/python3.11-minimal@3.11.2-6%2Bdeb12u2?arch=amd64",
        "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all",
    ]  # oldtool (deinstall ok config-files) is not in the image
    assert "hashes" not in refs[debs[0]]  # dpkg keeps no package digest; none is invented
    # the venv's own distributions, with the digest of their RECORD
    numpy = next(c for c in bom["components"] if c["name"].lower() == "numpy")
    assert numpy["purl"] == f"pkg:pypi/numpy@{numpy['version']}"
    assert len(numpy["hashes"][0]["content"]) == 64
    # the installed llmctl distribution is the runtime component, listed once
    runtime = refs["pkg:pypi/llmctl@0.1.0"]
    assert runtime["type"] == "application"
    assert sum(c.get("purl", "").startswith("pkg:pypi/llmctl@") for c in bom["components"]) == 1
    # components sorted, refs unique, the image depends on every part but the training data
    keys = [(c["type"], c["bom-ref"]) for c in bom["components"]]
    assert keys == sorted(keys) and len(refs) == len(keys)
    (dep,) = bom["dependencies"]
    assert dep["ref"] == "image:llmctl/starcoder2-test:0.1.0"
    assert set(dep["dependsOn"]) == {r for r, c in refs.items() if c["type"] != "data"}


def test_model_component_pins_weights_and_licence(gguf: Path, validator: Any) -> None:
    bom = _build(gguf, None, site_packages=[])
    assert validator.validate_str(sbom_json(bom).decode()) is None
    wf = weight_file(gguf, image_path="/models/model.gguf")
    (model,) = [c for c in bom["components"] if c["type"] == "machine-learning-model"]
    assert model["hashes"] == [{"alg": "SHA-256", "content": wf.sha256}]
    assert model["components"][0]["name"] == "/models/model.gguf"
    assert model["components"][0]["hashes"] == [{"alg": "SHA-256", "content": wf.sha256}]
    assert model["licenses"] == [{"license": {"name": "bigcode-openrail-m", "url": BIGCODE_LICENSE_URL}}]
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props == {
        "llmctl:architecture": "starcoder2",
        "llmctl:context-length": "512",
        "llmctl:file-format": "GGUF",
        "llmctl:quantization": "Q8_0",
    }
    params = model["modelCard"]["modelParameters"]
    assert params["modelArchitecture"] == "Starcoder2ForCausalLM"
    assert params["datasets"] == [{"ref": "data:bigcode/the-stack-v2"}]
    data = _by_ref(bom)["data:bigcode/the-stack-v2"]
    assert data["data"] == [{"type": "dataset", "name": "bigcode/the-stack-v2"}]


def test_license_as_spdx_id_is_what_the_schema_rejects(gguf: Path, validator: Any) -> None:
    """Guards the choice above: OpenRAIL has no SPDX id, so the `id` form would make the BOM invalid."""
    bom = _build(gguf, None, site_packages=[])
    model = next(c for c in bom["components"] if c["type"] == "machine-learning-model")
    model["licenses"] = [{"license": {"id": "bigcode-openrail-m"}}]
    assert validator.validate_str(json.dumps(bom)) is not None


def test_same_inputs_give_identical_bytes(gguf: Path, rootfs: Path, tmp_path: Path) -> None:
    a, b = _build(gguf, rootfs), _build(gguf, rootfs)
    assert sbom_json(a) == sbom_json(b)
    assert a["serialNumber"].startswith("urn:uuid:")

    other = make_model(tmp_path / "other.gguf", arch="starcoder2", wtype="q8_0", seed=1)
    c = _build(gguf, rootfs, weights=[weight_file(other, image_path="/models/model.gguf")])
    assert sbom_digest(c) != sbom_digest(a)
    assert c["serialNumber"] != a["serialNumber"]


def test_source_date_epoch_is_the_default_timestamp(gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1714564800")
    bom = _build(gguf, None, site_packages=[], timestamp=None)
    assert bom["metadata"]["timestamp"] == "2024-05-01T12:00:00Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(SbomError, match="SOURCE_DATE_EPOCH"):
        _build(gguf, None, site_packages=[], timestamp=None)


def test_dpkg_status_multiline_fields_and_states(rootfs: Path) -> None:
    pkgs = {p.name: p for p in parse_dpkg_status(rootfs / "var/lib/dpkg/status")}
    assert sorted(pkgs) == ["base-files", "libc6", "python3.11-minimal"]
    assert pkgs["libc6"].version == "2.36-9+deb12u7"
    assert {p.name for p in debian_packages(rootfs)} == {*pkgs, "tzdata"}


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("Package: a\nVersion: 1\nArchitecture: all\n\nthis is not a field\n", 5, "expected 'Field: value'"),
        (" leading continuation\n", 1, "continuation line"),
        ("Package: a\nStatus: install ok installed\nArchitecture: all\n", 1, "no Version"),
    ],
)
def test_malformed_dpkg_status_names_file_and_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(text)
    with pytest.raises(SbomError) as e:
        debian_packages(tmp_path)
    assert str(e.value).startswith(f"{status}:{line}: ")
    assert what in str(e.value)


def test_bad_inputs_are_refused(gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(SbomError, match="no weight files"):
        _build(gguf, None, site_packages=[], weights=[])
    with pytest.raises(SbomError, match="site-packages directory does not exist"):
        _build(gguf, None, site_packages=[tmp_path / "nope"])
