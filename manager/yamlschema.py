"""YAML or JSON documents validated by JSON Schema, with errors that say file, line and field.

Every user-written file llmctl reads (Model manifests, the trust policy, later charts and stacks)
goes through here, so a mistake always reads the same way, on one line:

    policy.yaml:7: trust policy field rules[1].requireSBOM: 'yes' is not of type 'boolean'; see docs/policy.md

PyYAML's `construct` forgets where values came from, so the document is first composed into a node
tree (which keeps marks), constructed from that tree, and the tree is walked once more to map each
JSON path to its line. JSON is YAML, so JSON files get line numbers too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from manager.errors import LlmctlError

JsonPath = tuple[str | int, ...]

# Aliases can make a tiny file expand into a huge tree ("billion laughs"); nothing llmctl reads is
# anywhere near this many values, so refuse before validation walks the expansion.
MAX_NODES = 100_000
MAX_MESSAGE = 200  # jsonschema quotes whole instances in its messages; keep errors on one short line
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def format_path(path: JsonPath) -> str:
    """``spec.rules[2].keys[0]``; ``(top level)`` for the document itself."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"  # a key with dots or spaces would make the dotted form ambiguous
    return out or "(top level)"


def _one_line(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@dataclass(frozen=True)
class Document:
    """A parsed, schema-valid document and where each of its values was written."""

    data: Any
    source: str
    what: str
    error_type: type[LlmctlError]
    docs_hint: str = ""
    lines: Mapping[JsonPath, int] = field(default_factory=dict)

    def line(self, path: JsonPath) -> int:
        """The line of the value at `path` (of a mapping entry: its key's line), else of its nearest parent."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def error(self, path: JsonPath, message: str, *, line: int | None = None) -> LlmctlError:
        """The error to raise for a problem with the value at `path` (for checks the schema cannot express)."""
        hint = f"; {self.docs_hint}" if self.docs_hint else ""
        where = f"{self.source}:{line or self.line(path)}"
        return self.error_type(f"{where}: {self.what} field {format_path(path)}: {_one_line(message)}{hint}")


def _syntax_error(e: yaml.YAMLError, text: str, source: str, error: type[LlmctlError]) -> LlmctlError:
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML forbids: it has a position, no mark
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        problem = f"character #x{e.character:04x} is not allowed ({e.reason})"
    else:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problem = getattr(e, "problem", None) or str(e)
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None and cmark is not mark:
            # "while parsing a flow sequence" points at the opening bracket: often the real mistake
            problem = f"{context} (line {cmark.line + 1}, column {cmark.column + 1}): {problem}"
    return error(f"{source}:{line}:{col}: not valid YAML/JSON: {_one_line(problem)}")


def _index_lines(
    root: yaml.Node, constructor: yaml.SafeLoader, source: str, error: type[LlmctlError]
) -> dict[JsonPath, int]:
    """JSON path -> 1-based line: a mapping entry's key line, a list item's own line."""
    lines: dict[JsonPath, int] = {}
    count = 0

    def walk(node: yaml.Node, path: JsonPath, line: int, parents: frozenset[int]) -> None:
        nonlocal count
        count += 1
        if count > MAX_NODES:
            raise error(f"{source}: more than {MAX_NODES} values (too many aliases?); refusing to read it")
        if id(node) in parents:
            raise error(f"{source}:{node.start_mark.line + 1}: a YAML alias refers to itself; not supported")
        lines[path] = line
        inner = parents | {id(node)}
        if isinstance(node, yaml.MappingNode):
            # the constructor has already flattened merge keys (<<) into node.value
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a mapping or list as a key: no JSON path can name it
                key = constructor.construct_object(key_node)  # the same key the data holds ("1" vs 1)
                walk(value_node, (*path, key), key_node.start_mark.line + 1, inner)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i), item.start_mark.line + 1, inner)

    walk(root, (), root.start_mark.line + 1, frozenset())
    return lines


def _error_line(doc: Document, e: jsonschema.ValidationError) -> int:
    path = tuple(e.absolute_path)
    if e.validator == "additionalProperties" and isinstance(e.instance, dict) and isinstance(e.schema, dict):
        # point at the first unexpected key, not at the object that holds it
        known, patterns = e.schema.get("properties", {}), e.schema.get("patternProperties", {})
        for key in e.instance:
            if key not in known and not any(re.search(p, str(key)) for p in patterns):
                return doc.line((*path, key))
    return doc.line(path)


def _path_key(path: JsonPath) -> tuple[tuple[int, int, str], ...]:
    # list indexes and mapping keys may meet at one depth (a YAML mapping with int keys): no TypeError
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)


def parse_text(
    text: str,
    source: str,
    schema: dict[str, Any],
    *,
    what: str,
    error: type[LlmctlError],
    docs_hint: str = "",
) -> Document:
    """Parse YAML (or JSON) and validate it; `error` carries the first problem, located as ``source:line``.

    Schema errors are reported in document order (then by JSON path), so the first one is stable.
    """
    hint = f"; {docs_hint}" if docs_hint else ""
    if not text.strip():
        raise error(f"{source}: is empty; expected a {what} in YAML or JSON{hint}")
    try:
        loader = yaml.SafeLoader(text)  # checks every character up front (ReaderError)
    except yaml.YAMLError as e:
        raise _syntax_error(e, text, source, error) from None
    try:
        root = loader.get_single_node()  # a second document ("---") is an error here
        if root is None:  # comments only
            raise error(f"{source}: is empty (only comments); expected a {what} in YAML or JSON{hint}")
        data = loader.construct_document(root)
        lines = _index_lines(root, loader, source, error)
    except yaml.YAMLError as e:
        raise _syntax_error(e, text, source, error) from None
    finally:
        loader.dispose()
    doc = Document(data, source, what, error, docs_hint, lines)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if errors:
        located = sorted(((_error_line(doc, e), _path_key(tuple(e.absolute_path)), i, e) for i, e in enumerate(errors)))
        line, _, _, first = located[0]
        raise doc.error(tuple(first.absolute_path), first.message, line=line)
    return doc


def parse_file(
    path: Path,
    schema: dict[str, Any],
    *,
    what: str,
    error: type[LlmctlError],
    docs_hint: str = "",
) -> Document:
    """`parse_text` on a UTF-8 file; unreadable or non-UTF-8 files are one-line errors naming it."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(
            f"{path}:{line}: is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"save the {what} as UTF-8"
        ) from None
    return parse_text(text, str(path), schema, what=what, error=error, docs_hint=docs_hint)


def load_text(
    text: str,
    source: str,
    schema: dict[str, Any],
    *,
    what: str,
    error: type[LlmctlError],
    docs_hint: str = "",
) -> Any:
    """The validated data of a document that is not a file (`source` names it in errors)."""
    return parse_text(text, source, schema, what=what, error=error, docs_hint=docs_hint).data


def load_document(
    path: Path,
    schema: dict[str, Any],
    *,
    what: str,
    error: type[LlmctlError],
    docs_hint: str = "",
) -> Any:
    """The validated data of a YAML or JSON file; see `parse_text` for the errors."""
    return parse_file(path, schema, what=what, error=error, docs_hint=docs_hint).data
