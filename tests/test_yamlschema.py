"""`manager.yamlschema`: every error is one line naming the file, the line and the JSON path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from manager.errors import LlmctlError
from manager.yamlschema import format_path, load_document, load_text, parse_text


class DocError(LlmctlError):
    pass


SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "spec"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "spec": {
            "type": "object",
            "required": ["rules"],
            "additionalProperties": False,
            "properties": {
                "rules": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["keys"],
                        "additionalProperties": False,
                        "properties": {
                            "keys": {"type": "array", "items": {"type": "string"}},
                            "limit": {"type": "integer"},
                        },
                    },
                },
            },
        },
    },
}

GOOD = """\
# a comment first
name: demo
spec:
  rules:
    - keys: [a, b]
      limit: 3
    - keys:
        - c
        - d
"""


def load(tmp_path: Path, text: str | bytes, name: str = "doc.yaml") -> Any:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return load_document(path, SCHEMA, what="thing", error=DocError, docs_hint="see docs/thing.md")


def error_of(tmp_path: Path, text: str | bytes, name: str = "doc.yaml") -> str:
    with pytest.raises(DocError) as info:
        load(tmp_path, text, name)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_valid_document_is_returned_as_data(tmp_path: Path) -> None:
    assert load(tmp_path, GOOD) == {
        "name": "demo",
        "spec": {"rules": [{"keys": ["a", "b"], "limit": 3}, {"keys": ["c", "d"]}]},
    }


def test_wrong_type_in_a_nested_list_item_names_its_line_and_path(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD.replace("- d", "- 4"))
    assert (
        message
        == f"{tmp_path / 'doc.yaml'}:9: thing field spec.rules[1].keys[1]: 4 is not of type 'string'; see docs/thing.md"
    )


def test_wrong_type_of_a_mapping_value_points_at_its_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD.replace("limit: 3", "limit: many"))
    assert ":6: thing field spec.rules[0].limit: 'many' is not of type 'integer'" in message


def test_a_flow_list_item_is_on_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD.replace("[a, b]", "[a,\n      7]"))
    assert ":6: thing field spec.rules[0].keys[1]: 7 is not of type 'string'" in message


def test_missing_required_property_is_reported_at_the_parent_object(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD.replace("    - keys:\n        - c\n        - d\n", "    - limit: 1\n"))
    assert ":7: thing field spec.rules[1]: 'keys' is a required property" in message
    top = error_of(tmp_path, "\n\nspec: {rules: []}\n")
    assert ":3: thing field (top level): 'name' is a required property" in top


def test_additional_property_points_at_the_unexpected_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD + "  extra: 1\n")
    assert message.startswith(f"{tmp_path / 'doc.yaml'}:10: thing field spec: Additional properties are not allowed")
    assert "'extra' was unexpected" in message


def test_the_first_error_in_the_file_is_reported(tmp_path: Path) -> None:
    text = GOOD.replace("name: demo", "name: 1").replace("- d", "- 4")
    assert ":2: thing field name: 1 is not of type 'string'" in error_of(tmp_path, text)


def test_json_input_gets_line_numbers_too(tmp_path: Path) -> None:
    doc = {"name": "demo", "spec": {"rules": [{"keys": ["a"]}, {"keys": ["b", 2]}]}}
    text = json.dumps(doc, indent=2)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip() == "2")
    message = error_of(tmp_path, text, "doc.json")
    assert f"doc.json:{line}: thing field spec.rules[1].keys[1]: 2 is not of type 'string'" in message
    assert load(tmp_path, json.dumps({"name": "x", "spec": {"rules": []}}), "ok.json") == {
        "name": "x",
        "spec": {"rules": []},
    }


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    message = error_of(tmp_path, "name: demo\nspec: {rules: [\nother: 1\n")
    # the problem is seen at the end of the file; the context points at the unclosed "["
    assert message.startswith(f"{tmp_path / 'doc.yaml'}:4:1: not valid YAML/JSON")
    assert "while parsing a flow sequence (line 2, column 15)" in message
    bad_indent = error_of(tmp_path, "name: demo\n  spec: 1\n")
    assert ":2:7: not valid YAML/JSON" in bad_indent


def test_two_documents_are_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, "name: a\n---\nname: b\n")
    assert ":2:1: not valid YAML/JSON" in message and "expected a single document" in message


@pytest.mark.parametrize("text", ["", "  \n\n", "# only a comment\n"])
def test_empty_files_are_a_clear_error(tmp_path: Path, text: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'doc.yaml'}: is empty")


def test_bytes_that_are_not_utf8_name_the_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, b"name: demo\nspec: caf\xe9\n")
    assert message.startswith(f"{tmp_path / 'doc.yaml'}:2: is not UTF-8 text (byte 0xe9")


def test_control_characters_are_a_syntax_error(tmp_path: Path) -> None:
    assert ":2:7: not valid YAML/JSON" in error_of(tmp_path, "name: a\nspec: \x01\n")


def test_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DocError, match=r"missing\.yaml: cannot read the thing: No such file"):
        load_document(tmp_path / "missing.yaml", SCHEMA, what="thing", error=DocError)
    with pytest.raises(DocError, match="cannot read the thing: Is a directory"):
        load_document(tmp_path, SCHEMA, what="thing", error=DocError)


def test_aliases_that_refer_to_themselves_are_refused(tmp_path: Path) -> None:
    assert "alias refers to itself" in error_of(tmp_path, "name: &a [*a]\nspec: {rules: []}\n")


def test_load_text_names_the_source_it_is_given() -> None:
    with pytest.raises(DocError, match=r"^chart demo \(values\):2: thing field spec: 'rules' is a required property$"):
        load_text("name: demo\nspec: {}\n", "chart demo (values)", SCHEMA, what="thing", error=DocError)


def test_document_lines_serve_checks_the_schema_cannot_express() -> None:
    doc = parse_text(GOOD, "doc.yaml", SCHEMA, what="thing", error=DocError)
    assert doc.line(("spec", "rules", 1)) == 7
    assert doc.line(("spec", "rules", 1, "keys", 0)) == 8
    assert doc.line(("spec", "nowhere", 3)) == 3  # nearest known parent
    err = doc.error(("spec", "rules", 0, "limit"), "must be below 3\n(it is 3)")
    assert str(err) == "doc.yaml:6: thing field spec.rules[0].limit: must be below 3 (it is 3)"


def test_long_messages_are_shortened() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    with pytest.raises(DocError) as info:
        load_text("x: {" + ", ".join(f"k{i}: {i}" for i in range(200)) + "}\n", "s", schema, what="t", error=DocError)
    assert len(str(info.value)) < 250 and str(info.value).endswith("...")


def test_path_notation() -> None:
    assert format_path(()) == "(top level)"
    assert format_path(("spec", "rules", 2, "keys", 0)) == "spec.rules[2].keys[0]"
    assert format_path(("metadata", "labels", "app.kubernetes.io/name")) == "metadata.labels['app.kubernetes.io/name']"
