"""The request validator (runtime/server/validation.py): strict JSON types, bounds, unions, nested
paths, and the one-line error each refusal carries. Over HTTP, tests/test_server.py checks the
status and `param` of every endpoint's malformed bodies."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.server import schemas
from runtime.server.validation import Bounds, Invalid, field, validate


@dataclass(kw_only=True, frozen=True)
class Inner:
    flag: bool
    name: str = "x"


@dataclass(kw_only=True, frozen=True)
class Sample:
    count: Annotated[int, Bounds(ge=0, le=10)] = 1
    ratio: Annotated[float, Bounds(gt=0)] = 1.0
    text: Annotated[str, Bounds(min_length=1, max_length=3)] = "a"
    words: Annotated[list[str], Bounds(max_length=2)] = field(factory=list)
    either: str | list[int] | None = field(None, about="a string or a list of ids")
    plain: int | str | None = None
    inner: Inner | None = None
    inners: list[Inner] = field(factory=list)
    needed: int = field(about="an integer")


def refusal(obj: Any) -> Invalid:
    with pytest.raises(Invalid) as e:
        validate(Sample, obj)
    return e.value


def test_valid_body_keeps_values_fills_defaults_and_ignores_unknown_fields() -> None:
    got = validate(Sample, {"needed": 3, "count": 10, "either": [1, 2], "inner": {"flag": True}, "unknown": [1]})
    assert got == Sample(needed=3, count=10, either=[1, 2], inner=Inner(flag=True))
    assert validate(Sample, {"needed": 0}).words is not validate(Sample, {"needed": 0}).words


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("count", True, "must be an integer"),  # a boolean is not a number
        ("count", 1.0, "must be an integer"),
        ("count", "1", "must be an integer"),
        ("ratio", "1.5", "must be a number"),
        ("ratio", False, "must be a number"),
        ("text", 5, "must be a string"),
        ("words", "ab", "must be a list"),
        ("inner", [], "must be an object or null"),
        ("plain", 1.5, "must be an integer or a string or null"),
        ("count", None, "must be an integer"),
    ],
)
def test_json_types_are_strict(key: str, value: Any, problem: str) -> None:
    e = refusal({"needed": 1, key: value})
    assert (e.path, e.problem, e.param) == ([key], problem, key)
    assert e.message == f"'{key}' {problem}"


def test_an_integer_is_a_valid_float_and_becomes_one() -> None:
    got = validate(Sample, {"needed": 1, "ratio": 2})
    assert got.ratio == 2.0 and type(got.ratio) is float
    assert refusal({"needed": 1, "ratio": 10**400}).problem == "is too large"


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("count", -1, "must be >= 0"),
        ("count", 11, "must be <= 10"),
        ("ratio", 0, "must be > 0"),
        ("text", "", "must not be empty"),
        ("text", "abcd", "must have at most 3 characters"),
        ("words", ["a", "b", "c"], "must have at most 2 items"),
    ],
)
def test_bounds(key: str, value: Any, problem: str) -> None:
    e = refusal({"needed": 1, key: value})
    assert (e.path, e.problem) == ([key], problem)


def test_bounds_hold_at_their_edges() -> None:
    got = validate(Sample, {"needed": 1, "count": 0, "text": "abc", "words": ["a", "b"], "ratio": 1e-300})
    assert (got.count, got.text, got.words) == (0, "abc", ["a", "b"])


def test_missing_and_mistyped_fields_say_what_the_field_must_be() -> None:
    assert refusal({}).message == "'needed' is required: an integer"
    assert refusal({"needed": 1, "either": 5}).message == "'either' must be a string or a list of ids"
    assert refusal([1]).message == "the request body must be an object"


def test_errors_inside_lists_and_objects_name_the_path() -> None:
    e = refusal({"needed": 1, "inners": [{"flag": True}, {"name": "y"}]})
    assert (e.message, e.param) == ("'inners.1.flag' is required", "inners")
    # a union member of the value's JSON type that fails within it is the error reported
    assert refusal({"needed": 1, "inner": {"flag": 1}}).message == "'inner.flag' must be a boolean"
    assert refusal({"needed": 1, "either": [1, "x"]}).message == "'either.1' must be an integer"


def test_request_types_are_frozen() -> None:
    req = validate(schemas.TokenizeRequest, {"content": "x"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.content = "y"  # type: ignore[misc]


def test_unsupported_annotation_is_a_programming_error() -> None:
    @dataclass(kw_only=True)
    class Odd:
        when: dict[str, int]

    with pytest.raises(TypeError, match="request fields cannot be"):
        validate(Odd, {"when": {}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
REQUEST_TYPES: list[type[Any]] = [
    schemas.CompletionRequest,
    schemas.ChatCompletionRequest,
    schemas.LlamaCompletionRequest,
    schemas.InfillRequest,
    schemas.TokenizeRequest,
    schemas.DetokenizeRequest,
]
FIELDS = sorted({f.name for cls in REQUEST_TYPES for f in dataclasses.fields(cls)})


@given(
    cls=st.sampled_from(REQUEST_TYPES),
    body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=6),
)
def test_any_json_object_is_accepted_or_refused_with_a_field_named(cls: type[Any], body: dict[str, Any]) -> None:
    body = json.loads(json.dumps(body))
    try:
        req: Any = validate(cls, body)
    except Invalid as e:
        assert e.param in {f.name for f in dataclasses.fields(cls)}
        assert e.message.startswith(f"'{e.param}")
        return
    for f in dataclasses.fields(cls):  # what was sent is what the handler sees (objects become dataclasses)
        if f.name in body and not _holds_object(body[f.name]):
            assert getattr(req, f.name) == body[f.name]


def _holds_object(v: Any) -> bool:
    return isinstance(v, dict) or (isinstance(v, list) and any(_holds_object(x) for x in v))
