"""The charts llmctl ships: in sync with charts/generate.py, lint-clean, and rendering manifests that
pin the real weights of ../shared/reference/weights-catalog.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from manager import chart_repos, charts
from manager.manifest import parse_manifest

CHARTS = Path(__file__).resolve().parent.parent / "charts"
NAMES = sorted(p.name for p in CHARTS.iterdir() if (p / "Chart.yaml").is_file())
CATALOG = {  # sha256 pinned by Tabby's public registry for the Q8_0 files
    "starcoder2-3b": "0499b8d046c56934c9741fd00c6206a5f7ca0eb42b59304ab7f4a20cd2f28ebf",
    "starcoder2-7b": "72a8a59486cdcc8549e5a17a5c5ec66b6ce5db71a9408a2800985791a40fbff0",
    "starcoderbase-1b": "1bb6441486d102db03dac30c82d6b1029ee4f9f5d73f27444fa58cbfcd7cfa0f",
    "starcoderbase-3b": "9798b7cba84ade7c69ff9f033d60c954e16b18f4d01829993b5fe7e33a49ba81",
    "starcoderbase-7b": "33dfcc7e216f1a072b4e16cd3bb19a0e55f5874ed319416435c8fc99216b8bfa",
}


def test_the_shipped_set_is_complete() -> None:
    assert NAMES == sorted([*CATALOG, "starcoder2-3b-q4", "starcoder2-7b-q4", "demo"])


def test_checked_in_charts_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate", CHARTS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    for chart, files in module.all_charts().items():
        for rel, text in files.items():
            assert (CHARTS / chart / rel).read_text() == text, f"charts/{chart}/{rel}: run python charts/generate.py"


@pytest.mark.parametrize("name", NAMES)
def test_chart_lints_without_errors(name: str) -> None:
    assert [m for m in charts.lint(CHARTS / name) if m.severity == "error"] == []


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"demo"}))
def test_chart_renders_a_manifest_pinning_the_catalog_digest(name: str) -> None:
    chart = charts.load_chart(chart_repos.resolve(name, None, CHARTS))  # found by name, like install
    assert chart.values["server"]["repack"] is True
    values = charts.merge_values(chart, sets=["server.parallel=4", "resources.memory=8g", "server.repack=false"])
    text, _ = charts.render_manifest(chart, values, charts.ReleaseInfo("sc2"))
    m = parse_manifest(text, name, Path.cwd())
    source = name.removesuffix("-q4")
    assert m.weights_sha256 == f"sha256:{CATALOG[source]}" and m.weights_url.startswith("https://huggingface.co/")
    assert m.requantize == ("Q4_0" if name.endswith("-q4") else None)
    assert m.quantization == ("Q4_0" if name.endswith("-q4") else "Q8_0")
    assert (m.parallel, m.repack, m.memory, m.host, m.license) == (4, False, "8g", "127.0.0.1", "bigcode-openrail-m")
    assert m.architecture == ("starcoder2" if name.startswith("starcoder2") else "starcoder")


def test_a_mirror_moves_the_file_but_never_changes_the_pin() -> None:
    chart = charts.load_chart(CHARTS / "starcoder2-7b-q4")
    mirror = "https://mirror.internal/models/starcoder2-7b_Q8_0.gguf"
    values = charts.merge_values(chart, sets=[f"weights.url={mirror}"])
    m = parse_manifest(charts.render_manifest(chart, values, charts.ReleaseInfo("x"))[0], "x", Path.cwd())
    assert m.weights_url == mirror and m.weights_sha256 == f"sha256:{CATALOG['starcoder2-7b']}"
    with pytest.raises(charts.ChartError, match="weights"):
        charts.validate_values(chart, charts.merge_values(chart, sets=["weights.sha256=sha256:" + "0" * 64]))


@pytest.mark.parametrize(
    "name,schema",
    [
        ("model-v1", "manager.manifest:SCHEMA"),
        ("trust-policy-v1", "manager.policy:POLICY_SCHEMA"),
        ("chart-v1", "manager.charts:CHART_SCHEMA"),
        ("stack-v1", "manager.stack:STACK_SCHEMA"),
    ],
)
def test_published_schemas_are_the_ones_in_force(name: str, schema: str) -> None:
    import importlib
    import json

    import jsonschema

    module, attr = schema.split(":")
    live = getattr(importlib.import_module(module), attr)
    published = json.loads((CHARTS.parent / "docs" / "schemas" / f"{name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(published)
    assert published == live, f"docs/schemas/{name}.json is stale: run scripts/write_schemas.py"
