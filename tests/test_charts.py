"""Charts: loading (directory and .tgz), --set parsing, values precedence, schema checks, sandboxed
rendering, the Model pick, lint, reproducible packages and safe unpacking. Real files, no mocks."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from manager import charts
from manager.charts import ChartError, ReleaseInfo, RequiredValueError
from tests.fileserver import serving

FIXTURE = Path(__file__).parent / "fixtures" / "charts" / "demo"
DIGEST = "sha256:" + "0" * 64


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    return tmp_path / "home"


@pytest.fixture
def chart_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "demo"))


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


MINIMAL_MODEL = """\
apiVersion: llmctl.dev/v1
kind: Model
metadata: {name: {{ Chart.Name }}, version: {{ Chart.Version | quote }}}
spec:
  license: mit
  files: [{url: "https://example.com/m.gguf", sha256: "DIGEST"}]
""".replace("DIGEST", DIGEST)


def minimal_chart(root: Path, name: str = "mini") -> Path:
    """A chart with only what load_chart requires."""
    write(root, "Chart.yaml", f"apiVersion: llmctl.dev/v1\nname: {name}\nversion: 1.0.0\n")
    write(root, "templates/model.yaml", MINIMAL_MODEL)
    return root


def with_template(chart: charts.Chart, text: str, name: str = "templates/model.yaml") -> charts.Chart:
    from dataclasses import replace

    return replace(chart, templates={**chart.templates, name: text})


def render_one(chart: charts.Chart, text: str, values: dict[str, Any] | None = None, **release: Any) -> str:
    chart = with_template(chart, text)
    out = charts.render(chart, chart.values if values is None else values, ReleaseInfo("r1", **release))
    return out["templates/model.yaml"]


# -- loading ----------------------------------------------------------------------------------------
def test_load_directory(chart_dir: Path) -> None:
    (chart_dir / "templates" / ".model.yaml.swp").write_bytes(b"\xff\xfe")  # editor files are not templates
    write(chart_dir, "templates/model.yaml~", "old")
    chart = charts.load_chart(chart_dir)
    assert chart.meta == charts.ChartMeta(
        api_version="llmctl.dev/v1",
        name="demo",
        version="0.1.0",
        app_version="1.0.0",
        description="A tiny demo code model for tests",
        keywords=("demo", "starcoder", "test"),
        license="apache-2.0",
    )
    assert chart.root == chart_dir
    assert chart.values["server"] == {"threads": 4, "context": 512, "parallel": 2}
    assert chart.schema is not None and chart.schema["type"] == "object"
    assert sorted(chart.templates) == ["templates/_helpers.tpl", "templates/model.yaml"]
    assert chart.readme is not None and chart.readme.startswith("# demo")


def test_minimal_chart_defaults(tmp_path: Path) -> None:
    chart = charts.load_chart(minimal_chart(tmp_path / "mini"))
    assert chart.values == {} and chart.schema is None and chart.readme is None
    assert (chart.meta.app_version, chart.meta.description, chart.meta.keywords, chart.meta.license) == ("", "", (), "")


def test_tgz_round_trip(chart_dir: Path, tmp_path: Path, home: Path) -> None:
    tgz = charts.package(chart_dir, tmp_path / "out")
    assert tgz == tmp_path / "out" / "demo-0.1.0.tgz"
    a, b = charts.load_chart(chart_dir), charts.load_chart(tgz)
    assert (a.meta, a.values, a.schema, a.templates, a.readme) == (b.meta, b.values, b.schema, b.templates, b.readme)
    assert b.root.name == "demo" and home / "cache" in b.root.parents
    assert charts.load_chart(tgz).root == b.root  # unpacked once, by digest
    text, _ = charts.render_manifest(b, b.values, ReleaseInfo("x"))
    assert "kind: Model" in text


CHART_YAML_ERRORS = [
    # (Chart.yaml, line, what the message must say)
    ("apiVersion: llmctl.dev/v1\nversion: 1.0.0\n", 1, "'name' is a required property"),
    ("apiVersion: v2\nname: x\nversion: 1.0.0\n", 1, "field apiVersion: 'llmctl.dev/v1' was expected"),
    ("apiVersion: llmctl.dev/v1\nname: My Chart\nversion: 1.0.0\n", 2, "field name: 'My Chart' does not match"),
    ("apiVersion: llmctl.dev/v1\nname: x\nversion: 1.0\n", 3, "field version: 1.0 is not of type 'string'"),
    ("apiVersion: llmctl.dev/v1\nname: x\nversion: v1.0.0\n", 3, "'v1.0.0' is not a SemVer 2.0 version"),
    ("apiVersion: llmctl.dev/v1\nname: x\nversion: 1.0.0\nicon: a.png\n", 4, "('icon' was unexpected)"),
    ("apiVersion: llmctl.dev/v1\nname: x\nversion: 1.0.0\nkeywords: code\n", 4, "field keywords: 'code' is not of"),
    ("apiVersion: llmctl.dev/v1\nname: x\nversion: 1.0.0\nkeywords: [a, 1]\n", 4, "field keywords[1]: 1 is not"),
    ("apiVersion: llmctl.dev/v1\nname: x\nversion: 1.0.0\nappVersion: 2\n", 4, "field appVersion: 2 is not of"),
    ("apiVersion: llmctl.dev/v1\nname: x\ndescription: a: b\nversion: 1.0.0\n", 3, "not valid YAML/JSON"),
]


@pytest.mark.parametrize(("text", "line", "message"), CHART_YAML_ERRORS)
def test_chart_yaml_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    root = minimal_chart(tmp_path / "c")
    write(root, "Chart.yaml", text)
    with pytest.raises(ChartError) as e:
        charts.load_chart(root)
    assert str(e.value).startswith(f"{root}/Chart.yaml:{line}:")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_semver_accepts_prerelease_and_build(tmp_path: Path) -> None:
    root = minimal_chart(tmp_path / "c")
    write(root, "Chart.yaml", "apiVersion: llmctl.dev/v1\nname: c\nversion: 1.2.3-rc.1+build.5\n")
    assert charts.load_chart(root).meta.version == "1.2.3-rc.1+build.5"
    assert sorted(["1.0.0", "1.0.0-rc.1", "1.0.0-alpha", "0.9.10", "0.9.9"], key=charts.version_key) == [
        "0.9.9",
        "0.9.10",
        "1.0.0-alpha",
        "1.0.0-rc.1",
        "1.0.0",
    ]


def test_chart_structure_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ChartError, match=r"not a chart \(no Chart.yaml\)"):
        charts.load_chart(empty)
    with pytest.raises(ChartError, match="no such chart directory or archive"):
        charts.load_chart(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ChartError, match="expected a chart directory or a .tgz"):
        charts.load_chart(tmp_path / "file.txt")

    root = minimal_chart(tmp_path / "c")
    shutil.rmtree(root / "templates")
    with pytest.raises(ChartError, match="has no templates/ directory"):
        charts.load_chart(root)
    write(root, "templates/_helpers.tpl", "{% macro x() %}{% endmacro %}")
    with pytest.raises(ChartError, match="no templates .files starting with _ are helpers"):
        charts.load_chart(root)


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        ("values.yaml", "a: 1\nb: [1, 2\n", "values.yaml:3:1: not valid YAML/JSON"),
        ("values.yaml", "- a\n- b\n", "values.yaml:1: values file field (top level): ['a', 'b'] is not of type"),
        (
            "values.schema.json",
            '{"type": "object",\n "properties": {}\n',
            "values.schema.json:3:1: not valid JSON: Expecting ',' delimiter",
        ),
        (
            "values.schema.json",
            '{\n  "type": "object",\n  "properties": {\n    "a": {"type": "strin"}\n  }\n}\n',
            "values.schema.json:4: values schema field properties.a.type: not a valid JSON Schema",
        ),
        ("values.schema.json", "[1, 2]", "values.schema.json:1: a JSON Schema is a JSON object"),
        ("templates/model.yaml", "a: \udcff", "templates/model.yaml:1: is not UTF-8 text"),
    ],
)
def test_malformed_files(tmp_path: Path, rel: str, text: str, expected: str) -> None:
    root = minimal_chart(tmp_path / "c")
    (root / rel).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ChartError) as e:
        charts.load_chart(root)
    assert f"{root}/{expected}" in str(e.value)


def test_blank_values_file_is_empty(tmp_path: Path) -> None:
    root = minimal_chart(tmp_path / "c")
    write(root, "values.yaml", "# nothing here yet\n\n---\n")
    assert charts.load_chart(root).values == {}


# -- --set ------------------------------------------------------------------------------------------
SET_CASES = [
    # Helm's documented examples (helm.sh/docs/intro/using_helm/#the-format-and-limitations-of---set)
    (["name=value"], {"name": "value"}),
    (["a=b,c=d"], {"a": "b", "c": "d"}),
    (["outer.inner=value"], {"outer": {"inner": "value"}}),
    (["name={a, b, c}"], {"name": ["a", "b", "c"]}),
    (["servers[0].port=80"], {"servers": [{"port": 80}]}),
    (["servers[0].port=80,servers[0].host=example"], {"servers": [{"port": 80, "host": "example"}]}),
    (["name=value1\\,value2"], {"name": "value1,value2"}),
    (["nodeSelector.kubernetes\\.io/role=master"], {"nodeSelector": {"kubernetes.io/role": "master"}}),
    # type inference like Helm: bools, null, integers; floats and leading zeros stay strings
    (
        ["a=true,b=FALSE,c=null,d=42,e=-7,f=0,g=007,h=1.5,i="],
        {"a": True, "b": False, "c": None, "d": 42, "e": -7, "f": 0, "g": "007", "h": "1.5", "i": ""},
    ),
    (["a[2]=x"], {"a": [None, None, "x"]}),
    (["a[0][1]=x"], {"a": [[None, "x"]]}),
    (["a={}"], {"a": []}),
    (["a={1,true},b=2"], {"a": [1, True], "b": 2}),
    (["a.b=1", "a.c=2", "a.b=3"], {"a": {"b": 3, "c": 2}}),  # later arguments win, mappings merge
    (["a=1", "a.b=2"], {"a": {"b": 2}}),
    (["a=1,"], {"a": 1}),
    (["url=https://x.test/a?b=c"], {"url": "https://x.test/a?b=c"}),
]


@pytest.mark.parametrize(("args", "expected"), SET_CASES)
def test_parse_set(args: list[str], expected: dict[str, Any]) -> None:
    assert charts.parse_set(args) == expected


def test_parse_set_string_keeps_strings() -> None:
    assert charts.parse_set(["a=true,b=42,c=null", "d={1,2}"], strings=True) == {
        "a": "true",
        "b": "42",
        "c": "null",
        "d": ["1", "2"],
    }


@pytest.mark.parametrize(
    ("arg", "problem"),
    [
        ("x", "expected KEY=VALUE"),
        ("", "expected KEY=VALUE"),
        ("=1", "a key is empty"),
        ("a..b=1", "a key is empty"),
        ("a,b=1", "expected KEY=VALUE"),
        ("a[x]=1", "list index is written [N]"),
        ("a[0]b=1", "after a list index"),
        ("a[99999999]=1", "above the limit"),
        ("a={x,y", "not closed"),
        ("a={x}y", "expected ',' after the list"),
        ("a=b\\", "lone backslash"),
    ],
)
def test_parse_set_errors(arg: str, problem: str) -> None:
    with pytest.raises(ChartError) as e:
        charts.parse_set([arg])
    assert str(e.value).startswith(f"--set {arg!r}: ")
    assert problem in str(e.value)
    with pytest.raises(ChartError, match="^--set-string "):
        charts.parse_set([arg], strings=True)


# -- values -----------------------------------------------------------------------------------------
def test_merge_precedence(chart_dir: Path, tmp_path: Path) -> None:
    chart = charts.load_chart(chart_dir)
    f1 = write(tmp_path, "f1.yaml", "server: {threads: 6, context: 1024}\nmodel: {name: from-f1}\n")
    f2 = write(tmp_path, "f2.yaml", "server: {threads: 7}\n")
    base = {"server": {"threads": 5, "parallel": 3}, "model": {"name": "from-base"}}

    def threads(**kw: Any) -> Any:
        return charts.merge_values(chart, **kw)["server"]["threads"]

    assert threads() == 4  # chart default
    assert threads(base=base) == 5
    assert threads(base=base, files=[f1]) == 6
    assert threads(base=base, files=[f1, f2]) == 7
    assert threads(base=base, files=[f1, f2], sets=["server.threads=8"]) == 8
    assert threads(files=[f2], sets=["server.threads=8"], set_strings=["server.threads=9"]) == "9"
    merged = charts.merge_values(chart, files=[f1, f2], base=base)
    assert merged["server"] == {"threads": 7, "context": 1024, "parallel": 3}  # mappings merge key by key
    assert merged["model"] == {"name": "from-f1"}
    assert merged["weights"] == chart.values["weights"]
    assert chart.values["server"]["threads"] == 4  # the chart's defaults are not modified


def test_reuse_values_base(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    previous = charts.merge_values(chart, sets=["server.threads=16", "weights.storage=mount"])
    again = charts.merge_values(chart, sets=["server.parallel=3"], base=previous)
    assert again["server"] == {"threads": 16, "context": 512, "parallel": 3}
    assert again["weights"]["storage"] == "mount"


def test_null_deletes_key(chart_dir: Path, tmp_path: Path) -> None:
    chart = charts.load_chart(chart_dir)
    f = write(tmp_path, "f.yaml", "network:\n  host: null\n")
    merged = charts.merge_values(chart, files=[f])
    assert merged["network"] == {"port": 0}
    merged = charts.merge_values(chart, sets=["server=null"])
    assert "server" not in merged and "network" in merged
    # a null in an earlier user layer is replaced by a later value, as in Helm
    assert charts.merge_values(chart, files=[f], sets=["network.host=::1"])["network"]["host"] == "::1"
    assert "new" not in charts.merge_values(chart, sets=["new=null"])


def test_values_file_errors(chart_dir: Path, tmp_path: Path) -> None:
    chart = charts.load_chart(chart_dir)
    bad = write(tmp_path, "bad.yaml", "server:\n  threads: [1\n")
    with pytest.raises(ChartError, match=rf"^{bad}:3:1: not valid YAML"):
        charts.merge_values(chart, files=[bad])
    listy = write(tmp_path, "list.yaml", "- 1\n")
    with pytest.raises(ChartError, match=rf"^{listy}:1: values file field \(top level\)"):
        charts.merge_values(chart, files=[listy])
    with pytest.raises(ChartError, match="cannot read the values file"):
        charts.merge_values(chart, files=[tmp_path / "missing.yaml"])
    empty = write(tmp_path, "empty.yaml", "")
    assert charts.merge_values(chart, files=[empty]) == chart.values


def test_validate_values_names_the_field(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    charts.validate_values(chart, chart.values)
    with pytest.raises(ChartError) as e:
        charts.validate_values(chart, charts.merge_values(chart, sets=["server.threads=0"]))
    assert str(e.value) == (
        "demo: values field server.threads: 0 is less than the minimum of 1; "
        "check your -f/--set values (values.schema.json)"
    )
    with pytest.raises(ChartError, match=r"values field network.port: '80' is not of type 'integer'"):
        charts.validate_values(chart, charts.merge_values(chart, set_strings=["network.port=80"]))
    with pytest.raises(ChartError, match=r"values field weights: 'url' is a required property"):
        charts.validate_values(chart, charts.merge_values(chart, sets=["weights.url=null"]))
    with pytest.raises(ChartError, match=r"values field \(top level\)"):
        charts.validate_values(chart, [])  # type: ignore[arg-type]


def test_values_schema_refs_never_fetch(tmp_path: Path) -> None:
    with serving() as server:
        server.add("/s.json", b'{"type": "integer"}')
        root = minimal_chart(tmp_path / "c")
        schema = json.dumps({"type": "object", "properties": {"a": {"$ref": server.url("/s.json")}}})
        write(root, "values.schema.json", schema)
        write(root, "values.yaml", "a: 1\n")
        chart = charts.load_chart(root)
        with pytest.raises(ChartError, match=r"cannot resolve \$ref"):
            charts.validate_values(chart, chart.values)
        assert server.requests == []
    # references inside the schema work
    write(
        root, "values.schema.json", '{"$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}}'
    )
    chart = charts.load_chart(root)
    charts.validate_values(chart, {"a": 1})
    with pytest.raises(ChartError, match="values field a: 'x' is not of type 'integer'"):
        charts.validate_values(chart, {"a": "x"})


def test_draft7_schema_is_honoured(tmp_path: Path) -> None:
    root = minimal_chart(tmp_path / "c")
    write(
        root,
        "values.schema.json",
        '{"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", '
        '"properties": {"n": {"type": "integer", "exclusiveMaximum": 3}}}',
    )
    chart = charts.load_chart(root)
    with pytest.raises(ChartError, match="values field n: 3 is greater than or equal to the maximum of 3"):
        charts.validate_values(chart, {"n": 3})


# -- rendering --------------------------------------------------------------------------------------
def test_render_context(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    text = render_one(
        chart,
        "chart: {{ Chart.Name }} {{ Chart.Version }} {{ Chart.AppVersion }} {{ Chart.License }}\n"
        "keywords: {{ Chart.Keywords | join(',') }}\n"
        "description: {{ Chart.Description | quote }}\n"
        "release: {{ Release.Name }} {{ Release.Revision }} {{ Release.IsInstall }} {{ Release.IsUpgrade }}\n"
        "threads: {{ Values.server.threads }}\n",
        revision=3,
        is_upgrade=True,
    )
    assert text == (
        "chart: demo 0.1.0 1.0.0 apache-2.0\n"
        "keywords: demo,starcoder,test\n"
        'description: "A tiny demo code model for tests"\n'
        "release: r1 3 False True\n"
        "threads: 4\n"
    )


def test_filters(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    values = {"m": {"b": 1, "a": [1, "x"]}, "s": 'say "hi": #1', "n": None, "e": ""}
    text = render_one(
        chart,
        "y:\n{{ Values.m | toyaml | indent(2, true) }}\n"
        "j: {{ Values.m | tojson }}\n"
        "q: {{ Values.s | quote }}\n"
        "d: {{ Values.missing | default('dflt') }}\n"
        "ni: {{ Values.m | toyaml | nindent(2) }}\n"
        "sc: {{ 'x' | toyaml }}\n",
        values,
    )
    assert yaml.safe_load(text) == {
        "y": {"b": 1, "a": [1, "x"]},
        "j": {"b": 1, "a": [1, "x"]},
        "q": 'say "hi": #1',
        "d": "dflt",
        "ni": {"b": 1, "a": [1, "x"]},
        "sc": "x",
    }
    assert "y:\n  b: 1\n  a:\n  - 1\n  - x\n" in text  # toyaml keeps the key order


def test_values_keys_named_like_dict_methods(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    assert render_one(chart, "{{ Values.items }} {{ Values.keys }}", {"items": 3, "keys": "k"}) == "3 k"


def test_required(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    template = "a: 1\nb: {{ required(Values.weights.sha256, 'pin the weights: set weights.sha256') }}\n"
    assert render_one(chart, template) == f"a: 1\nb: {DIGEST}\n"
    for values in ({"weights": {"sha256": None}}, {"weights": {"sha256": ""}}, {"weights": {}}):
        with pytest.raises(RequiredValueError) as e:
            render_one(chart, template, values)
        assert (
            str(e.value) == "demo: templates/model.yaml:2: required value missing: pin the weights: set weights.sha256"
        )
    with pytest.raises(RequiredValueError, match="model.yaml:1: required value missing: as a filter"):
        render_one(chart, "{{ Values.nope | required('as a filter') }}", {})


def test_undefined_value_names_template_and_line(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    with pytest.raises(ChartError) as e:
        render_one(chart, "a: 1\n\nb: {{ Values.server.nosuch }}\n")
    message = str(e.value)
    assert message.startswith("demo: templates/model.yaml:3: undefined value: ")
    assert "'nosuch'" in message and "| default(...)" in message
    assert e.value.file == "templates/model.yaml"


def test_syntax_error_names_template_and_line(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    with pytest.raises(ChartError, match=r"^demo: templates/model.yaml:2: template syntax error: unexpected '}'"):
        render_one(chart, "a: 1\nb: {{ Values.x }\n")
    # a helper is compiled even when nothing includes it
    bad_helper = with_template(chart, "{% macro m() %}{{ x }", "templates/_broken.tpl")
    with pytest.raises(ChartError, match=r"^demo: templates/_broken.tpl:1: template syntax error"):
        charts.render(bad_helper, chart.values, ReleaseInfo("r"))


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ Values.__class__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ range.__self__ }}",
        "{{ Values.server.update({'threads': 1}) }}",  # the immutable sandbox: no mutation of values
        "{{ 'x' * 100000000 }}",
        "{{ 2 ** 100000 }}",
    ],
)
def test_sandbox_refuses(chart_dir: Path, template: str) -> None:
    chart = charts.load_chart(chart_dir)
    with pytest.raises(ChartError) as e:
        render_one(chart, "a: 1\n" + template + "\n")
    assert str(e.value).startswith("demo: templates/model.yaml:2: ")
    assert chart.values["server"]["threads"] == 4


def test_helpers_are_not_output_and_errors_point_into_them(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    out = charts.render(chart, chart.values, ReleaseInfo("r1"))
    assert list(out) == ["templates/model.yaml"]
    assert 'description: "r1-demo-model"' in out["templates/model.yaml"]
    chart = with_template(chart, "{% macro m() %}\n{{ Values.model.nosuch }}\n{% endmacro %}\n", "templates/_h.tpl")
    with pytest.raises(ChartError) as e:
        render_one(chart, '{% import "templates/_h.tpl" as h %}\nx: 1\ny: {{ h.m() }}\n')
    assert str(e.value).startswith("demo: templates/_h.tpl:2 (included from templates/model.yaml:3): undefined value")
    with pytest.raises(ChartError, match="template '_h.tpl' not found; name helpers by their chart path"):
        render_one(chart, '{% include "_h.tpl" %}')


def test_other_runtime_errors(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    with pytest.raises(ChartError, match=r"^demo: templates/model.yaml:2: ZeroDivisionError"):
        render_one(chart, "a: 1\nb: {{ 1 // 0 }}\n")


# -- render_manifest --------------------------------------------------------------------------------
def test_render_manifest(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    values = charts.merge_values(chart, sets=["weights.storage=mount", "server.threads=8"])
    text, doc = charts.render_manifest(chart, values, ReleaseInfo("r1"))
    assert doc["kind"] == "Model" and doc["metadata"] == {
        "name": "demo-model",
        "version": "1.0.0",
        "description": "r1-demo-model",
    }
    assert doc["spec"]["storage"] == "mount" and doc["spec"]["server"]["threads"] == 8
    assert yaml.safe_load(text) == doc
    from manager.manifest import parse_manifest

    manifest = parse_manifest(text, "demo (rendered)", chart.root)
    assert (manifest.name, manifest.weights_storage, manifest.threads) == ("demo-model", "mount", 8)


def test_render_manifest_validates_values_first(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    with pytest.raises(ChartError, match="values field server.threads"):
        charts.render_manifest(chart, charts.merge_values(chart, sets=["server.threads=0"]), ReleaseInfo("r"))


def test_render_manifest_picks_the_model_document(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    model = chart.templates["templates/model.yaml"]
    chart = with_template(chart, "kind: Note\ntext: before\n---\n" + model + "---\nkind: Note\n")
    chart = with_template(chart, "kind: Other\n", "templates/other.yaml")
    chart = with_template(chart, "Thanks for installing {{ Release.Name }}", "templates/NOTES.txt")
    text, doc = charts.render_manifest(chart, chart.values, ReleaseInfo("r1"))
    assert doc["kind"] == "Model"
    assert text.startswith("apiVersion: llmctl.dev/v1\nkind: Model\n") and "Note" not in text
    assert yaml.safe_load(text) == doc


def test_render_manifest_needs_exactly_one_model(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    none = with_template(chart, "kind: Note\n")
    with pytest.raises(ChartError, match="no template renders a document with kind: Model; exactly one must"):
        charts.render_manifest(none, chart.values, ReleaseInfo("r"))
    two = with_template(chart, "apiVersion: llmctl.dev/v1\nkind: Model\n", "templates/second.yaml")
    with pytest.raises(ChartError) as e:
        charts.render_manifest(two, chart.values, ReleaseInfo("r"))
    assert "2 documents have kind: Model (templates/model.yaml (line 1 of its output), templates/second.yaml" in str(
        e.value
    )


def test_render_manifest_invalid_yaml_names_template_and_line(chart_dir: Path) -> None:
    chart = charts.load_chart(chart_dir)
    bad = with_template(chart, "kind: Model\nname: {{ Values.model.name }}\n  oops: {{ 'a: b' }}\n")
    with pytest.raises(ChartError) as e:
        charts.render_manifest(bad, chart.values, ReleaseInfo("r"))
    assert str(e.value).startswith("demo: templates/model.yaml: renders YAML that is not valid at line 3, column")


# -- lint -------------------------------------------------------------------------------------------
def test_lint_clean_chart(chart_dir: Path) -> None:
    assert charts.lint(chart_dir) == []


def test_lint_warnings_for_a_minimal_chart(tmp_path: Path) -> None:
    msgs = charts.lint(minimal_chart(tmp_path / "mini"))
    assert all(m.severity != "error" for m in msgs)
    got = {(m.severity, m.file, m.message.split(";")[0]) for m in msgs}
    assert got == {
        ("warning", "values.schema.json", "no values.schema.json"),
        ("warning", "README.md", "no README.md"),
        ("warning", "Chart.yaml", "description is not set"),
        ("warning", "Chart.yaml", "keywords is not set"),
        ("warning", "Chart.yaml", "license is not set"),
        ("info", "Chart.yaml", "appVersion is not set (the version of the model it installs)"),
    }


def test_lint_collects_errors(chart_dir: Path, tmp_path: Path) -> None:
    write(chart_dir, "Chart.yaml", "apiVersion: llmctl.dev/v1\nname: demo\nversion: one\n")
    write(chart_dir, "values.yaml", "a: [\n")
    write(chart_dir, "values.schema.json", "{")
    msgs = charts.lint(chart_dir)
    assert [(m.severity, m.file) for m in msgs] == [
        ("error", "Chart.yaml"),
        ("error", "values.yaml"),
        ("error", "values.schema.json"),
    ]
    assert "Chart.yaml:3:" in msgs[0].message and "not a SemVer" in msgs[0].message
    assert charts.lint(tmp_path / "nowhere")[0].severity == "error"


def test_lint_render_and_model_errors(chart_dir: Path) -> None:
    model = chart_dir / "templates" / "model.yaml"
    text = model.read_text()
    model.write_text(text.replace("{{ Values.model.name }}", "{{ Values.model.nosuch }}"))
    [msg] = [m for m in charts.lint(chart_dir) if m.severity == "error"]
    assert msg.file == "templates/model.yaml" and "templates/model.yaml:5: undefined value" in msg.message

    model.write_text(text.replace("quantization: Q8_0", "quantization: Q3"))
    [msg] = [m for m in charts.lint(chart_dir) if m.severity == "error"]
    assert msg.file == "templates/model.yaml"  # the line is the rendered output's (the import line renders empty)
    assert msg.message.startswith("templates/model.yaml (rendered):9: Model field spec.quantization: 'Q3' is not one")

    write(chart_dir, "values.yaml", "server: {threads: 0}\n")
    model.write_text(text)
    [msg] = [m for m in charts.lint(chart_dir) if m.severity == "error"]
    assert msg.file == "values.yaml" and "default values field server.threads" in msg.message


def test_lint_required_values(chart_dir: Path, tmp_path: Path) -> None:
    write(chart_dir, "values.yaml", (FIXTURE / "values.yaml").read_text().replace(f'"{DIGEST}"', "null"))
    [msg] = charts.lint(chart_dir)
    assert msg.severity == "warning" and "required value missing: weights.sha256 is required" in msg.message
    assert charts.lint(chart_dir, sets=[f"weights.sha256={DIGEST}"]) == []
    bad = write(tmp_path, "v.yaml", "weights: {sha256: ''}\n")
    [msg] = charts.lint(chart_dir, files=[bad])
    assert msg.severity == "error"


# -- package ----------------------------------------------------------------------------------------
def test_package_is_reproducible(chart_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = charts.package(chart_dir, tmp_path / "a").read_bytes()
    for p in chart_dir.rglob("*"):  # new mtimes and a copy elsewhere change nothing
        p.touch()
    copy = Path(shutil.copytree(chart_dir, tmp_path / "elsewhere" / "demo"))
    assert charts.package(copy, tmp_path / "b").read_bytes() == first
    assert charts.package(chart_dir, tmp_path / "a").read_bytes() == first  # replaced in place
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["demo-0.1.0.tgz"]

    with tarfile.open(fileobj=io.BytesIO(first)) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == [
        "demo",
        "demo/Chart.yaml",
        "demo/README.md",
        "demo/templates",
        "demo/templates/_helpers.tpl",
        "demo/templates/model.yaml",
        "demo/values.schema.json",
        "demo/values.yaml",
    ]
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 0)}
    assert {m.name: oct(m.mode) for m in members}["demo/templates"] == "0o755"
    assert {m.name: oct(m.mode) for m in members}["demo/values.yaml"] == "0o644"
    assert first[4:8] == b"\0\0\0\0"  # gzip header mtime

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    stamped = charts.package(chart_dir, tmp_path / "c").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(stamped)) as tf:
        assert {m.mtime for m in tf.getmembers()} == {1700000000}


def test_package_keeps_exec_bit_and_skips_vcs(chart_dir: Path, tmp_path: Path) -> None:
    script = write(chart_dir, "scripts/check.sh", "#!/bin/sh\n")
    script.chmod(0o700)
    write(chart_dir, ".git/config", "x")
    with tarfile.open(charts.package(chart_dir, tmp_path / "out")) as tf:
        modes = {m.name: m.mode for m in tf.getmembers()}
    assert modes["demo/scripts/check.sh"] == 0o755
    assert not any(".git" in n for n in modes)


def test_package_refuses_lint_errors_and_links(chart_dir: Path, tmp_path: Path) -> None:
    write(chart_dir, "templates/model.yaml", "{{ Values.nosuch }}")
    with pytest.raises(ChartError, match=rf"^cannot package {chart_dir}: demo: templates/model.yaml:1: undefined"):
        charts.package(chart_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.copy(FIXTURE / "templates" / "model.yaml", chart_dir / "templates" / "model.yaml")
    (chart_dir / "link.txt").symlink_to("/etc/hostname")
    with pytest.raises(ChartError, match="is a symbolic link"):
        charts.package(chart_dir, tmp_path / "out")


# -- safe unpacking ---------------------------------------------------------------------------------
def make_tgz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def member(name: str, data: bytes | None = b"x", type_: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, link
    return info, data if type_ == tarfile.REGTYPE else None


def good_members(top: str = "demo") -> list[tuple]:
    return [
        member(f"{top}/Chart.yaml", b"apiVersion: llmctl.dev/v1\nname: demo\nversion: 1.0.0\n"),
        member(f"{top}/templates/model.yaml", MINIMAL_MODEL.encode()),
    ]


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (member("demo/../../evil.txt"), "points outside the chart directory"),
        (member("/etc/evil.txt"), "points outside the chart directory"),
        (member("demo/templates/link.yaml", type_=tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
        (member("demo/templates/hard.yaml", type_=tarfile.LNKTYPE, link="demo/Chart.yaml"), "is a link"),
        (member("demo/dev", type_=tarfile.CHRTYPE), "device or other special file"),
        (member("demo/fifo", type_=tarfile.FIFOTYPE), "device or other special file"),
        (member("other/file.txt"), "is not under the chart directory 'demo'/"),
        (member("demo/Chart.yaml"), "appears twice"),
    ],
)
def test_unpacking_refuses_unsafe_members(tmp_path: Path, home: Path, extra: tuple, problem: str) -> None:
    tgz = make_tgz(tmp_path / "evil.tgz", [*good_members(), extra])
    with pytest.raises(ChartError) as e:
        charts.load_chart(tgz)
    assert str(e.value).startswith(f"{tgz}: member ") and problem in str(e.value)
    assert not (tmp_path / "evil.txt").exists() and not (home.parent / "evil.txt").exists()
    unpacked = home / "cache" / "charts" / ".unpacked"
    assert list(unpacked.iterdir()) == []  # the half-unpacked directory is gone
    assert [m.severity for m in charts.lint(tgz)] == ["error"]


def test_unpacking_other_refusals(tmp_path: Path) -> None:
    with pytest.raises(ChartError, match="not a gzip-compressed tar archive"):
        charts.load_chart(write(tmp_path, "plain.tgz", "not an archive"))
    with pytest.raises(ChartError, match="the archive is empty"):
        charts.load_chart(make_tgz(tmp_path / "empty.tgz", []))
    renamed = make_tgz(tmp_path / "renamed.tgz", good_members("other"))
    with pytest.raises(ChartError, match="top directory is 'other' but Chart.yaml names the chart 'demo'"):
        charts.load_chart(renamed)
    huge = tarfile.TarInfo("demo/big.bin")
    huge.size = charts.MAX_ARCHIVE_BYTES + 1
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        tf.addfile(huge, io.BytesIO(b"\0" * huge.size))
    (tmp_path / "huge.tgz").write_bytes(gzip.compress(raw.getvalue()))
    with pytest.raises(ChartError, match="unpacks to more than"):
        charts.load_chart(tmp_path / "huge.tgz")


def test_chart_errors_in_an_archive_name_the_archive(tmp_path: Path) -> None:
    members = good_members()
    members[0] = member("demo/Chart.yaml", b"apiVersion: llmctl.dev/v1\nname: demo\nversion: x\n")
    tgz = make_tgz(tmp_path / "demo.tgz", members)
    with pytest.raises(ChartError, match=rf"^{tgz}/demo/Chart.yaml:3: Chart.yaml field version"):
        charts.load_chart(tgz)


# -- show -------------------------------------------------------------------------------------------
def test_show(chart_dir: Path, tmp_path: Path) -> None:
    chart = charts.load_chart(chart_dir)
    assert yaml.safe_load(charts.show_chart(chart)) == yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    assert charts.show_chart(chart).startswith("apiVersion: llmctl.dev/v1\nname: demo\nversion: 0.1.0\n")
    assert charts.show_values(chart) == (chart_dir / "values.yaml").read_text()
    assert charts.show_values(charts.load_chart(minimal_chart(tmp_path / "m"))) == ""
