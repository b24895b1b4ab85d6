"""Charts: a directory (or ``.tgz``) of Jinja2 templates and values that renders one Model manifest.

A chart, as Helm users know it::

    mychart/
      Chart.yaml          # apiVersion: llmctl.dev/v1, name, version (SemVer 2), appVersion, description, ...
      values.yaml         # defaults
      values.schema.json  # optional JSON Schema for the merged values
      templates/*.yaml    # Jinja2; exactly one renders a document with `kind: Model`
      README.md           # optional

Charts from repositories are untrusted input: archives are unpacked only if every member is a plain
file or directory under one top directory, and templates render in Jinja2's immutable sandbox with
`StrictUndefined`. The pipeline is ``load_chart`` -> ``merge_values`` -> ``render_manifest``; the
caller validates the Model it returns with `manager.manifest`. Every error is one `ChartError` line
naming the file, the line (or the values field) and what to do.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Literal

import jinja2
import jsonschema
import referencing
import referencing.exceptions
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from manager import paths
from manager.errors import LlmctlError
from manager.yamlschema import format_path, parse_text

API_VERSION = "llmctl.dev/v1"
NAME_PATTERN = r"^[a-z0-9]+([._-][a-z0-9]+)*$"
# https://semver.org/#is-there-a-suggested-regular-expression-regex-to-check-a-semver-string
SEMVER_PATTERN = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][a-zA-Z0-9-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][a-zA-Z0-9-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SEMVER = re.compile(SEMVER_PATTERN)

CHART_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "llmctl Chart.yaml",
    "type": "object",
    "required": ["apiVersion", "name", "version"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 100},
        "version": {"type": "string", "pattern": SEMVER_PATTERN},
        "appVersion": {"type": "string"},
        "description": {"type": "string"},
        "keywords": {"type": "array", "items": {"type": "string"}},
        "license": {"type": "string"},
    },
}
# The SemVer regex would make jsonschema's message unreadable; the loader checks it itself.
_LOAD_SCHEMA: dict[str, Any] = {
    **CHART_SCHEMA,
    "properties": {**CHART_SCHEMA["properties"], "version": {"type": "string"}},
}
_CHART_HINT = "Chart.yaml keys: apiVersion (llmctl.dev/v1), name, version, appVersion, description, keywords, license"
_VALUES_SCHEMA: dict[str, Any] = {"type": "object"}

MAX_ARCHIVE_BYTES = 64 * 1024 * 1024  # compressed, and again for the sum of the unpacked files
MAX_ARCHIVE_MEMBERS = 10_000
MAX_SET_INDEX = 65_536  # Helm's limit on `--set a[N]=...`
MAX_SEQUENCE = 10 * 1024 * 1024  # a template cannot make a longer string or list with `*`
MAX_EXPONENT = 1024
_YAML_SUFFIXES = (".yaml", ".yml", ".json")
_SKIPPED_IN_PACKAGE = frozenset({".git", ".hg", ".svn", "__pycache__", ".DS_Store"})


class ChartError(LlmctlError):
    """A chart that cannot be loaded, rendered, linted or packaged; `file` is the chart file at fault."""

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


@dataclass(frozen=True)
class ChartMeta:
    """Chart.yaml."""

    api_version: str
    name: str
    version: str
    app_version: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    license: str = ""


@dataclass(frozen=True)
class Chart:
    """A loaded chart; `root` is its directory (a cache directory for a ``.tgz``)."""

    meta: ChartMeta
    root: Path
    values: dict[str, Any]
    schema: dict[str, Any] | None
    templates: dict[str, str]  # "templates/model.yaml" -> text
    readme: str | None


@dataclass(frozen=True)
class ReleaseInfo:
    """What templates see as ``Release``."""

    name: str
    revision: int = 1
    is_upgrade: bool = False


@dataclass(frozen=True)
class LintMessage:
    severity: Literal["error", "warning", "info"]
    file: str  # relative to the chart ("Chart.yaml", "templates/model.yaml"), or the archive's name
    message: str


def _one_line(message: str, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def version_key(version: str) -> tuple[Any, ...]:
    """SemVer 2.0 precedence as a sort key (build metadata ignored); non-SemVer strings sort first."""
    m = _SEMVER.match(version)
    if not m:
        return (-1,)
    pre = m.group(4)
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, ids)


def source_date_epoch() -> int | None:
    """``$SOURCE_DATE_EPOCH`` as an int, None when unset."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ChartError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds; unset it or fix it")
    return int(value)


# -- loading ----------------------------------------------------------------------------------------
def _read_text(path: Path, shown: str, what: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ChartError(f"{shown}: cannot read the {what}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ChartError(f"{shown}:{line}: is not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8") from None


def _is_blank_yaml(text: str) -> bool:
    """Empty, or only comments and document markers: an empty values file, as Helm reads it."""
    return all(not s or s.startswith("#") or s in ("---", "...") for s in (ln.strip() for ln in text.splitlines()))


def _load_values_text(text: str, shown: str) -> dict[str, Any]:
    if _is_blank_yaml(text):
        return {}
    data: dict[str, Any] = parse_text(text, shown, _VALUES_SCHEMA, what="values file", error=ChartError).data
    return data


def _meta_from_text(text: str, shown: str) -> ChartMeta:
    doc = parse_text(text, shown, _LOAD_SCHEMA, what="Chart.yaml", error=ChartError, docs_hint=_CHART_HINT)
    data = doc.data
    if not _SEMVER.match(data["version"]):
        raise doc.error(
            ("version",),
            f"{data['version']!r} is not a SemVer 2.0 version; write MAJOR.MINOR.PATCH, e.g. 1.0.0 or 1.0.0-rc.1",
        )
    return ChartMeta(
        api_version=data["apiVersion"],
        name=data["name"],
        version=data["version"],
        app_version=data.get("appVersion", ""),
        description=data.get("description", ""),
        keywords=tuple(data.get("keywords", ())),
        license=data.get("license", ""),
    )


def read_meta(chart_dir: Path) -> ChartMeta:
    """Only Chart.yaml of a chart directory (for listings that do not need the templates)."""
    path = chart_dir / "Chart.yaml"
    if not path.is_file():
        raise ChartError(f"{chart_dir}: not a chart (no Chart.yaml); a chart directory holds Chart.yaml and templates/")
    return _meta_from_text(_read_text(path, str(path), "Chart.yaml"), str(path))


def _read_schema(root: Path, shown: str) -> dict[str, Any] | None:
    path = root / "values.schema.json"
    if not path.exists():
        return None
    src = f"{shown}/values.schema.json"
    text = _read_text(path, src, "values schema")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChartError(
            f"{src}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}; values.schema.json must be JSON"
        ) from None
    if not isinstance(data, dict):
        raise ChartError(f"{src}:1: a JSON Schema is a JSON object, not {type(data).__name__}")
    cls = jsonschema.validators.validator_for(data, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(data)
    except jsonschema.SchemaError as e:
        doc = parse_text(text, src, {}, what="values schema", error=ChartError)  # JSON is YAML: line numbers
        raise doc.error(tuple(e.absolute_path), f"not a valid JSON Schema: {e.message}") from None
    return data


def _read_templates(root: Path, shown: str) -> dict[str, str]:
    tdir = root / "templates"
    if not tdir.is_dir():
        raise ChartError(f"{shown}: has no templates/ directory; add templates/model.yaml rendering a kind: Model")
    templates: dict[str, str] = {}
    for path in sorted(p for p in tdir.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(tdir).parts) or name.endswith("~"):
            continue  # editor swap and backup files, .gitkeep
        templates[name] = _read_text(path, f"{shown}/{name}", "template")
    if not any(not _is_helper(n) for n in templates):
        raise ChartError(
            f"{shown}/templates: no templates (files starting with _ are helpers); "
            "add templates/model.yaml rendering a kind: Model"
        )
    return templates


def _is_helper(name: str) -> bool:
    return PurePosixPath(name).name.startswith("_")


def _read_parts(root: Path, shown: str, on_error: Callable[[str, ChartError], None]) -> Chart | None:
    """Every part of a chart directory; problems go to `on_error(file, error)`; None if any part failed."""
    results: dict[str, Any] = {}

    def step(key: str, file: str, fn: Callable[[], Any]) -> None:
        try:
            results[key] = fn()
        except ChartError as e:
            on_error(file, e)

    if not (root / "Chart.yaml").is_file():
        problem = f"{shown}: not a chart (no Chart.yaml); a chart holds Chart.yaml, values.yaml and templates/"
        on_error("Chart.yaml", ChartError(problem))
        return None
    step("meta", "Chart.yaml", lambda: _meta_at(root, shown))
    step("values", "values.yaml", lambda: _optional_values(root / "values.yaml", f"{shown}/values.yaml"))
    step("schema", "values.schema.json", lambda: _read_schema(root, shown))
    step("templates", "templates", lambda: _read_templates(root, shown))
    readme = root / "README.md"
    step("readme", "README.md", lambda: _read_text(readme, f"{shown}/README.md", "README") if readme.exists() else None)
    if len(results) < 5:
        return None
    return Chart(results["meta"], root, results["values"], results["schema"], results["templates"], results["readme"])


def _optional_values(path: Path, shown: str) -> dict[str, Any]:
    return _load_values_text(_read_text(path, shown, "values file"), shown) if path.exists() else {}


def _meta_at(root: Path, shown: str) -> ChartMeta:
    src = f"{shown}/Chart.yaml"
    return _meta_from_text(_read_text(root / "Chart.yaml", src, "Chart.yaml"), src)


def _open(path: Path) -> tuple[Path, str, str | None]:
    """(chart directory, how to name it in messages, the archive's top directory or None)."""
    if path.is_dir():
        return path, str(path), None
    if not path.exists():
        raise ChartError(f"{path}: no such chart directory or archive")
    if not path.name.endswith((".tgz", ".tar.gz")):
        raise ChartError(f"{path}: not a chart; expected a chart directory or a .tgz made by `llmctl package`")
    root = _unpack(path)
    return root, f"{path}/{root.name}", root.name


def load_chart(path: Path) -> Chart:
    """Load a chart directory or ``.tgz``; the first problem is a `ChartError` naming file and line."""
    root, shown, top = _open(path)

    def fail(file: str, e: ChartError) -> None:
        raise e

    chart = _read_parts(root, shown, fail)
    assert chart is not None
    if top is not None and chart.meta.name != top:
        raise ChartError(
            f"{path}: the archive's top directory is {top!r} but Chart.yaml names the chart {chart.meta.name!r}; "
            "make the archive with `llmctl package`",
            file="Chart.yaml",
        )
    return chart


# -- archives ---------------------------------------------------------------------------------------
def _unpack(tgz: Path) -> Path:
    """Unpack into the cache (keyed by the archive's sha256) and return the chart directory in it."""
    try:
        size = tgz.stat().st_size
        if size > MAX_ARCHIVE_BYTES:
            raise ChartError(f"{tgz}: {size} bytes is more than a chart archive may be ({MAX_ARCHIVE_BYTES} bytes)")
        data = tgz.read_bytes()
    except OSError as e:
        raise ChartError(f"{tgz}: cannot read the chart archive: {e.strerror or e}") from None
    parent = paths.cache_dir() / "charts" / ".unpacked"
    target = parent / hashlib.sha256(data).hexdigest()
    if not target.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        try:
            _safe_extract(data, tgz, tmp)
            try:
                tmp.rename(target)  # atomic: a directory named by the digest is always complete
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tops = [p for p in target.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise ChartError(f"{target}: a damaged unpacked chart in the cache; delete that directory and try again")
    return tops[0]


def _safe_extract(data: bytes, tgz: Path, dest: Path) -> None:
    """Write the archive's files under `dest`; refuse anything but plain files and directories under one
    top directory (no absolute paths, ``..``, links or devices) and more than MAX_ARCHIVE_BYTES unpacked."""
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ChartError(
            f"{tgz}: not a gzip-compressed tar archive ({e}); make chart archives with `llmctl package`"
        ) from None
    top: str | None = None
    seen: set[tuple[str, ...]] = set()
    total = 0
    with tf:
        try:
            for count, m in enumerate(tf, 1):
                name = m.name
                if count > MAX_ARCHIVE_MEMBERS:
                    raise ChartError(f"{tgz}: more than {MAX_ARCHIVE_MEMBERS} members; refusing to unpack it")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or not parts or ".." in parts or "\\" in name:
                    raise ChartError(f"{tgz}: member {name!r} points outside the chart directory; refusing to unpack")
                if m.issym() or m.islnk():
                    raise ChartError(
                        f"{tgz}: member {name!r} is a link; chart archives may hold only files and directories"
                    )
                if not (m.isreg() or m.isdir()):
                    raise ChartError(f"{tgz}: member {name!r} is a device or other special file; refusing to unpack")
                if top is None:
                    top = parts[0]
                if parts[0] != top or (len(parts) == 1 and not m.isdir()):
                    raise ChartError(f"{tgz}: member {name!r} is not under the chart directory {top!r}/")
                if parts in seen:
                    raise ChartError(f"{tgz}: member {name!r} appears twice; refusing to unpack")
                seen.add(parts)
                out = dest.joinpath(*parts)
                if m.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                total += m.size
                if total > MAX_ARCHIVE_BYTES:
                    raise ChartError(f"{tgz}: unpacks to more than {MAX_ARCHIVE_BYTES} bytes; refusing to unpack")
                src = tf.extractfile(m)
                assert src is not None
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "xb") as f:
                    f.write(src.read())
                out.chmod(0o755 if m.mode & 0o111 else 0o644)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ChartError(f"{tgz}: corrupt chart archive ({e}); download or package it again") from None
    if top is None:
        raise ChartError(f"{tgz}: the archive is empty; make chart archives with `llmctl package`")


# -- values -----------------------------------------------------------------------------------------
class _SetParser:
    """One ``--set`` argument, Helm's strvals syntax: ``a.b=c,d[0]=e,f={x,y}`` with ``\\`` escapes."""

    def __init__(self, text: str, strings: bool) -> None:
        self.s = text
        self.i = 0
        self.strings = strings
        self.flag = "--set-string" if strings else "--set"

    def error(self, what: str) -> ChartError:
        return ChartError(f"{self.flag} {self.s!r}: {what}")

    def parse_into(self, out: dict[str, Any]) -> None:
        if not self.s:
            raise self.error("expected KEY=VALUE")
        while True:
            path = self.key()
            value, more = self.value()
            _assign(out, path, value)
            if not more or self.i >= len(self.s):  # Helm accepts a trailing comma
                return

    def key(self) -> list[str | int]:
        s = self.s
        path: list[str | int] = []
        name: list[str] = []
        prev = "start"  # what came last: start | name | dot | index
        while True:
            if self.i >= len(s) or s[self.i] == ",":
                raise self.error("expected KEY=VALUE")
            c = s[self.i]
            if c == "\\":
                if self.i + 1 >= len(s):
                    raise self.error("ends with a lone backslash")
                name.append(s[self.i + 1])
                self.i += 2
                prev = "name"
                continue
            if c not in ".[=":
                if prev == "index":
                    raise self.error("expected '.', '[' or '=' after a list index")
                name.append(c)
                self.i += 1
                prev = "name"
                continue
            if prev == "name":
                path.append("".join(name))
                name.clear()
            elif prev != "index":
                raise self.error("expected KEY=VALUE (a key is empty)")
            self.i += 1
            if c == "=":
                return path
            if c == ".":
                prev = "dot"
                continue
            end = s.find("]", self.i)  # c == "["
            digits = s[self.i : end] if end >= 0 else ""
            if not digits.isdigit():
                raise self.error("a list index is written [N] with a number N")
            index = int(digits)
            if index > MAX_SET_INDEX:
                raise self.error(f"list index {index} is above the limit of {MAX_SET_INDEX}")
            path.append(index)
            self.i = end + 1
            prev = "index"

    def chars_until(self, stops: str) -> tuple[str, str | None]:
        """Unescaped text up to a stop character (consumed), and which stop (None at the end)."""
        s, out = self.s, []
        while self.i < len(s):
            c = s[self.i]
            if c == "\\":
                if self.i + 1 >= len(s):
                    raise self.error("ends with a lone backslash")
                out.append(s[self.i + 1])
                self.i += 2
                continue
            self.i += 1
            if c in stops:
                return "".join(out), c
            out.append(c)
        return "".join(out), None

    def value(self) -> tuple[Any, bool]:
        if self.i < len(self.s) and self.s[self.i] == "{":
            self.i += 1
            items: list[Any] = []
            while True:
                raw, stop = self.chars_until(",}")
                if stop is None:
                    raise self.error("a list {...} is not closed with '}'")
                if raw.strip() or stop == "," or items:
                    items.append(_typed(raw.strip(), self.strings))
                if stop == "}":
                    break
            if self.i >= len(self.s):
                return items, False
            if self.s[self.i] != ",":
                raise self.error("expected ',' after the list's '}'")
            self.i += 1
            return items, True
        raw, stop = self.chars_until(",")
        return _typed(raw, self.strings), stop is not None


_INT = re.compile(r"^[-+]?[1-9][0-9]*$|^0$")


def _typed(raw: str, strings: bool) -> Any:
    """Helm's inference: true/false, null, integers; everything else (floats too) stays a string."""
    if strings:
        return raw
    lower = raw.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower == "null":
        return None
    if _INT.match(raw) and -(2**63) <= int(raw) < 2**63:
        return int(raw)
    return raw


def _assign(root: dict[str, Any], path: Sequence[str | int], value: Any) -> None:
    cur: Any = root
    for pos, part in enumerate(path):
        last = pos == len(path) - 1
        if isinstance(part, int):
            cur.extend([None] * (part + 1 - len(cur)))
        if last:
            cur[part] = value
            return
        want: type = list if isinstance(path[pos + 1], int) else dict
        child = cur[part] if isinstance(part, int) else cur.get(part)
        if not isinstance(child, want):
            child = want()
            cur[part] = child
        cur = child


def parse_set(assignments: Sequence[str], *, strings: bool = False) -> dict[str, Any]:
    """Helm ``--set`` (``strings=True``: ``--set-string``) arguments as nested values, later ones winning."""
    out: dict[str, Any] = {}
    for text in assignments:
        _SetParser(text, strings).parse_into(out)
    return out


def _merge(dst: Mapping[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
    """User layers over each other: mappings merge, everything else (lists, nulls) replaces."""
    out = dict(dst)
    for key, value in src.items():
        old = out.get(key)
        out[key] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else copy.deepcopy(value)
    return out


def _coalesce(defaults: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """User values over chart defaults; a null deletes the key (Helm's behaviour)."""
    out = copy.deepcopy(dict(defaults))
    for key, value in user.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            old = out.get(key)
            out[key] = _coalesce(old if isinstance(old, dict) else {}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values_file(path: Path) -> dict[str, Any]:
    """A ``-f`` values file: a YAML mapping (empty is ``{}``); errors name file, line and field."""
    return _load_values_text(_read_text(path, str(path), "values file"), str(path))


def merge_values(
    chart: Chart,
    files: Sequence[Path] = (),
    sets: Sequence[str] = (),
    set_strings: Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The values templates see, in Helm's precedence (later wins): chart defaults, `base` (the previous
    release's values, for ``--reuse-values``), each ``-f`` file in order, ``--set``, ``--set-string``."""
    user: dict[str, Any] = {}
    layers: list[Mapping[str, Any]] = [base or {}]
    layers += [load_values_file(f) for f in files]
    layers += [parse_set(sets), parse_set(set_strings, strings=True)]
    for layer in layers:
        user = _merge(user, layer)
    return _coalesce(chart.values, user)


def _path_key(path: Sequence[str | int]) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


def validate_values(chart: Chart, values: dict[str, Any], source: str = "values") -> None:
    """Check `values` against the chart's values.schema.json (nothing to do without one)."""
    if chart.schema is None:
        return
    cls = jsonschema.validators.validator_for(chart.schema, default=jsonschema.Draft202012Validator)
    # an empty registry: a $ref never fetches anything (an untrusted chart must not make requests)
    validator = cls(chart.schema, registry=referencing.Registry(), format_checker=cls.FORMAT_CHECKER)
    try:
        errors = sorted(validator.iter_errors(values), key=lambda e: _path_key(tuple(e.absolute_path)))
    except referencing.exceptions.Unresolvable as e:
        raise ChartError(
            f"{chart.meta.name}: values.schema.json: cannot resolve $ref {_one_line(str(e), 120)}; "
            "only references inside the schema are supported",
            file="values.schema.json",
        ) from None
    if errors:
        first = errors[0]
        raise ChartError(
            f"{chart.meta.name}: {source} field {format_path(tuple(first.absolute_path))}: "
            f"{_one_line(first.message, 200)}; check your -f/--set values (values.schema.json)",
            file="values.yaml",
        )


# -- rendering --------------------------------------------------------------------------------------
class _RequiredValueError(Exception):
    """Raised inside template code by `required`; surfaces as RequiredValueError."""


class RequiredValueError(ChartError):
    """A template's ``required(value, msg)`` found the value unset (the chart needs a -f/--set value)."""


def _required(value: Any, msg: str = "a required value is not set") -> Any:
    if value is None or isinstance(value, jinja2.Undefined) or (isinstance(value, str) and value == ""):
        raise _RequiredValueError(msg)
    return value


def _toyaml(value: Any) -> str:
    text = yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True)
    if text.endswith("\n...\n"):  # a lone scalar gets an explicit document end
        text = text[: -len("...\n")]
    return text.strip()


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _quote(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def _nindent(text: Any, width: int) -> str:
    pad = " " * width
    return "\n" + "\n".join(pad + line if line else line for line in str(text).split("\n"))


class _Loader(jinja2.BaseLoader):
    """Chart templates by their path in the chart; the file name is the template name, so traceback
    frames of template code carry it (that is how runtime errors find their line)."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        self.templates = templates

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        if template not in self.templates:
            raise jinja2.TemplateNotFound(template)
        return self.templates[template], template, lambda: True


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE:
                    raise SecurityError(f"a sequence of more than {MAX_SEQUENCE} items is not allowed")
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponents above {MAX_EXPONENT} are not allowed")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Values.items means the value named "items", not dict.items (Helm users write .Values.items)
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


def _environment(chart: Chart) -> jinja2.Environment:
    env = _Sandbox(
        loader=_Loader(chart.templates),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(toyaml=_toyaml, tojson=_tojson, quote=_quote, required=_required, nindent=_nindent)
    env.globals["required"] = _required
    return env


def _context(chart: Chart, values: dict[str, Any], release: ReleaseInfo) -> dict[str, Any]:
    m = chart.meta
    return {
        "Values": values,
        "Chart": {
            "Name": m.name,
            "Version": m.version,
            "AppVersion": m.app_version,
            "Description": m.description,
            "Keywords": list(m.keywords),
            "License": m.license,
        },
        "Release": {
            "Name": release.name,
            "Revision": release.revision,
            "IsInstall": not release.is_upgrade,
            "IsUpgrade": release.is_upgrade,
        },
    }


def _template_frames(tb: TracebackType | None, names: Mapping[str, str]) -> list[tuple[str, int]]:
    frames = []
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in names:
            frames.append((filename, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def _runtime_error(chart: Chart, name: str, e: Exception) -> ChartError:
    error: type[ChartError] = ChartError
    frames = _template_frames(e.__traceback__, chart.templates)
    file, line = frames[-1] if frames else (name, 0)
    where = f"{file}:{line}" if line else file
    if frames and frames[0][0] != file:
        where += f" (included from {frames[0][0]}:{frames[0][1]})"
    if isinstance(e, SecurityError):
        what = f"refused by the template sandbox: {str(e).rstrip('.')}"
    elif isinstance(e, jinja2.UndefinedError):
        what = f"undefined value: {e.message}; set it in values.yaml, -f or --set, or give a | default(...)"
    elif isinstance(e, _RequiredValueError):
        what = f"required value missing: {e}"
        error = RequiredValueError
    elif isinstance(e, jinja2.TemplateNotFound):
        what = f"template {e.name!r} not found; name helpers by their chart path, e.g. 'templates/_helpers.tpl'"
    else:
        what = f"{type(e).__name__}: {e}"
    return error(f"{chart.meta.name}: {where}: {_one_line(what)}", file=file)


def render(chart: Chart, values: dict[str, Any], release: ReleaseInfo) -> dict[str, str]:
    """Every template that is not a helper (a file whose name starts with ``_``), rendered.

    Helpers are compiled too, so a syntax error in one is reported even if nothing includes it.
    """
    env = _environment(chart)
    # globals, not render arguments: helpers imported without "with context" see Values too
    env.globals.update(_context(chart, values, release))
    compiled: dict[str, jinja2.Template] = {}
    for name in sorted(chart.templates):
        try:
            compiled[name] = env.get_template(name)
        except jinja2.TemplateSyntaxError as e:
            file = e.name or name
            raise ChartError(
                f"{chart.meta.name}: {file}:{e.lineno}: template syntax error: {_one_line(e.message or str(e))}",
                file=file,
            ) from None
    out: dict[str, str] = {}
    for name, template in compiled.items():
        if _is_helper(name):
            continue
        try:
            out[name] = template.render()
        except Exception as e:  # the boundary for untrusted template code: every failure is the chart's
            raise _runtime_error(chart, name, e) from None
    return out


@dataclass(frozen=True)
class _RenderedDoc:
    file: str
    line: int
    text: str
    data: Any


def _documents(chart: Chart, file: str, text: str) -> Iterator[_RenderedDoc]:
    loader = yaml.SafeLoader(text)
    nodes = []
    try:
        while loader.check_node():
            node = loader.get_node()
            nodes.append((node, loader.construct_document(node)))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(e, "problem", None) or str(e)
        raise ChartError(
            f"{chart.meta.name}: {file}: renders YAML that is not valid at {at} of its output: {_one_line(problem)}; "
            "check the template's indentation and quoting (| quote, | toyaml)",
            file=file,
        ) from None
    finally:
        loader.dispose()
    for node, data in nodes:
        doc_text = text if len(nodes) == 1 else text[node.start_mark.index : node.end_mark.index].rstrip("\n") + "\n"
        yield _RenderedDoc(file, node.start_mark.line + 1, doc_text, data)


def _find_model(chart: Chart, outputs: Mapping[str, str]) -> _RenderedDoc:
    models = [
        doc
        for file, text in sorted(outputs.items())
        if file.endswith(_YAML_SUFFIXES)
        for doc in _documents(chart, file, text)
        if isinstance(doc.data, dict) and doc.data.get("kind") == "Model"
    ]
    if not models:
        raise ChartError(
            f"{chart.meta.name}: no template renders a document with kind: Model; exactly one must "
            f"(templates: {', '.join(sorted(outputs)) or 'none'})",
            file="templates",
        )
    if len(models) > 1:
        where = ", ".join(f"{m.file} (line {m.line} of its output)" for m in models)
        raise ChartError(
            f"{chart.meta.name}: {len(models)} documents have kind: Model ({where}); a chart renders exactly one",
            file=models[1].file,
        )
    return models[0]


def render_manifest(chart: Chart, values: dict[str, Any], release: ReleaseInfo) -> tuple[str, dict[str, Any]]:
    """Validate `values`, render, and return the one ``kind: Model`` document: (its text, its data).

    The Model itself is not validated here; `manager.manifest` does that.
    """
    validate_values(chart, values)
    model = _find_model(chart, render(chart, values, release))
    return model.text, model.data


# -- lint, package, show ----------------------------------------------------------------------------
def lint(
    path: Path,
    *,
    files: Sequence[Path] = (),
    sets: Sequence[str] = (),
    set_strings: Sequence[str] = (),
) -> list[LintMessage]:
    """Everything `load_chart`/`render_manifest` would refuse, as errors: the chart is rendered with its
    default values (or those given, as for `merge_values`) and release name "lint", and the Model is
    checked against the manifest schema. Plus warnings for what a published chart should have. A
    ``required`` value that the defaults leave unset is only a warning when no values are given (such a
    chart is meant to be installed with -f/--set). Never raises for a bad chart."""
    from manager.manifest import SCHEMA as MODEL_SCHEMA

    msgs: list[LintMessage] = []
    try:
        root, shown, top = _open(path)
    except ChartError as e:
        return [LintMessage("error", path.name, str(e))]
    chart = _read_parts(root, shown, lambda file, e: msgs.append(LintMessage("error", e.file or file, str(e))))
    if chart is None:
        return msgs
    meta = chart.meta
    if top is not None and meta.name != top:
        msgs.append(LintMessage("error", "Chart.yaml", f"the archive's top directory {top!r} is not the chart name"))
    elif top is None and root.resolve().name != meta.name:
        msgs.append(
            LintMessage(
                "warning",
                "Chart.yaml",
                f"the directory is named {root.resolve().name!r} but the chart {meta.name!r}; name them alike",
            )
        )
    given = bool(files or sets or set_strings)
    try:
        values = merge_values(chart, files, sets, set_strings)
        validate_values(chart, values, source="values" if given else "default values")
        model = _find_model(chart, render(chart, values, ReleaseInfo("lint")))
        try:
            parse_text(model.text, f"{model.file} (rendered)", MODEL_SCHEMA, what="Model", error=ChartError)
        except ChartError as e:
            raise ChartError(str(e), file=model.file) from None
    except RequiredValueError as e:
        hint = "" if given else "; the Model was not checked: lint with -f/--set values to check it"
        msgs.append(LintMessage("error" if given else "warning", e.file or "templates", f"{e}{hint}"))
    except ChartError as e:
        msgs.append(LintMessage("error", e.file or "templates", str(e)))
    if chart.schema is None:
        msgs.append(LintMessage("warning", "values.schema.json", "no values.schema.json; values are not checked"))
    if chart.readme is None:
        msgs.append(LintMessage("warning", "README.md", "no README.md; `llmctl show readme` has nothing to show"))
    for key, value in (("description", meta.description), ("keywords", meta.keywords), ("license", meta.license)):
        if not value:
            msgs.append(LintMessage("warning", "Chart.yaml", f"{key} is not set; `llmctl search` uses it"))
    if not meta.app_version:
        msgs.append(LintMessage("info", "Chart.yaml", "appVersion is not set (the version of the model it installs)"))
    for name in chart.templates:
        if not _is_helper(name) and not name.endswith(_YAML_SUFFIXES) and PurePosixPath(name).name != "NOTES.txt":
            msgs.append(LintMessage("warning", name, "not .yaml/.yml/.json: rendered, but never read as a manifest"))
    return msgs


def _package_entries(root: Path) -> list[tuple[str, Path]]:
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_IN_PACKAGE)
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            if name in _SKIPPED_IN_PACKAGE or name.endswith(("~", ".pyc")):
                continue
            p = base / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                raise ChartError(f"{p}: is a symbolic link; chart archives hold only files and directories", file=rel)
            if not (p.is_file() or p.is_dir()):
                raise ChartError(f"{p}: is not a regular file; remove it from the chart", file=rel)
            entries.append((rel, p))
    return sorted(entries, key=lambda e: e[0].split("/"))


def package(path: Path, dest: Path) -> Path:
    """Write ``dest/NAME-VERSION.tgz``: byte-identical for the same files (sorted entries, owner 0,
    modes 0644/0755, mtimes from ``$SOURCE_DATE_EPOCH`` or 0). A chart with lint errors is refused."""
    errors = [m for m in lint(path) if m.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more; run `llmctl lint {path}`)" if len(errors) > 1 else ""
        raise ChartError(f"cannot package {path}: {errors[0].message}{more}", file=errors[0].file)
    chart = load_chart(path)
    mtime = source_date_epoch() or 0
    top = chart.meta.name
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel, p in [("", chart.root), *_package_entries(chart.root)]:
            info = tarfile.TarInfo(f"{top}/{rel}".rstrip("/"))
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
            if p.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                data = p.read_bytes()
                info.size = len(data)
                info.mode = 0o755 if os.stat(p).st_mode & 0o111 else 0o644
                tf.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{chart.meta.name}-{chart.meta.version}.tgz"
    write_atomic(target, out.getvalue())
    return target


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename (readers see the old or the new file, never a part)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def show_chart(chart: Chart) -> str:
    """Chart.yaml as YAML (keys in the documented order; unset optional keys left out)."""
    m = chart.meta
    data: dict[str, Any] = {"apiVersion": m.api_version, "name": m.name, "version": m.version}
    optional = {"appVersion": m.app_version, "description": m.description, "keywords": list(m.keywords)}
    data.update({k: v for k, v in {**optional, "license": m.license}.items() if v})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def show_values(chart: Chart) -> str:
    """values.yaml exactly as written (comments included); empty when the chart has none."""
    path = chart.root / "values.yaml"
    return _read_text(path, str(path), "values file") if path.exists() else ""
