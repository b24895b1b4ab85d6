"""Strict validation of a parsed JSON object into a request type, refusing it with one readable error.

Request types (runtime/server/schemas.py) are keyword-only dataclasses whose annotations say what
JSON each field takes: `bool`, `int`, `float`, `str`, `None`, `list[X]`, another request type,
unions of these, and `Annotated[X, Bounds(...)]` for ranges and lengths. JSON types are strict (a
number is not a string, a boolean is not a number; an integer is a valid float) and unknown
fields are ignored. A field's `about` (see `field`) is what the error says it must be.

pydantic did this job before; importing it and building the models took a quarter of the
interpreter's work before the server could answer (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING: Any = dataclasses.MISSING
_KINDS: dict[object, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
    list: "a list",
}


@dataclass(frozen=True)
class Bounds:
    """A number's range, or a string's or list's length."""

    ge: int | float | None = None
    gt: int | float | None = None
    le: int | float | None = None
    min_length: int | None = None
    max_length: int | None = None

    def check(self, v: Any) -> str | None:
        """Why `v` is out of bounds, or None."""
        if isinstance(v, str | list):
            unit = "characters" if isinstance(v, str) else "items"
            if self.min_length == 1 and not v:
                return "must not be empty"
            if self.min_length is not None and len(v) < self.min_length:
                return f"must have at least {self.min_length} {unit}"
            if self.max_length is not None and len(v) > self.max_length:
                return f"must have at most {self.max_length} {unit}"
            return None
        if self.ge is not None and v < self.ge:
            return f"must be >= {self.ge}"
        if self.gt is not None and v <= self.gt:
            return f"must be > {self.gt}"
        if self.le is not None and v > self.le:
            return f"must be <= {self.le}"
        return None


class Invalid(Exception):
    """The first thing wrong with a body: where (field names and list indices) and what."""

    def __init__(self, path: list[str | int], problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem

    @property
    def param(self) -> str | None:
        """The top-level field at fault (OpenAI's `param`)."""
        return str(self.path[0]) if self.path else None

    @property
    def message(self) -> str:
        where = ".".join(str(p) for p in self.path)
        return f"'{where}' {self.problem}" if where else f"the request body {self.problem}"


def field(default: Any = _MISSING, *, factory: Any = None, about: str | None = None) -> Any:
    """A request field: its default (none: the field is required) and what it must be, in words."""
    metadata = {"about": about}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(cls: type[T], obj: Any) -> T:
    """`obj` (parsed JSON) as a `cls`; Invalid naming the first field at fault."""
    return _object(cls, obj, [])


@dataclass(frozen=True)
class _Field:
    name: str
    hint: Any
    about: str | None
    required: bool


_FIELDS: dict[type, list[_Field]] = {}


def _fields(cls: type) -> list[_Field]:
    known = _FIELDS.get(cls)
    if known is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        known = [
            _Field(
                f.name,
                hints[f.name],
                f.metadata.get("about"),
                f.default is _MISSING and f.default_factory is _MISSING,
            )
            for f in dataclasses.fields(cls)
        ]
        _FIELDS[cls] = known
    return known


def _object(cls: type[T], obj: Any, path: list[str | int]) -> T:
    if type(obj) is not dict:
        raise Invalid(path, "must be an object")
    values: dict[str, Any] = {}
    for f in _fields(cls):
        where = [*path, f.name]
        if f.name not in obj:
            if f.required:
                raise Invalid(where, "is required" + (f": {f.about}" if f.about else ""))
            continue
        try:
            values[f.name] = _value(f.hint, obj[f.name], where)
        except Invalid as e:
            if f.about is None or e.path != where:
                raise
            raise Invalid(where, f"must be {f.about}") from None
    return cls(**values)


def _value(hint: Any, v: Any, path: list[str | int]) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        value = _value(hint.__origin__, v, path)
        for bounds in hint.__metadata__:
            problem = bounds.check(value)
            if problem is not None:
                raise Invalid(path, problem)
        return value
    if origin is types.UnionType or origin is typing.Union:
        inside: list[Invalid] = []  # members of the value's JSON type that failed within it
        for member in typing.get_args(hint):
            try:
                return _value(member, v, path)
            except Invalid as e:
                if len(e.path) > len(path):
                    inside.append(e)
        if len(inside) == 1:
            raise inside[0]
        raise Invalid(path, "must be " + " or ".join(_describe(m) for m in typing.get_args(hint)))
    if origin is list:
        if type(v) is not list:
            raise Invalid(path, "must be a list")
        (item,) = typing.get_args(hint)
        return [_value(item, x, [*path, i]) for i, x in enumerate(v)]
    if dataclasses.is_dataclass(hint):
        return _object(hint, v, path)  # type: ignore[arg-type]
    if hint is float:
        if type(v) is int:
            try:
                return float(v)
            except OverflowError:
                raise Invalid(path, "is too large") from None
        if type(v) is float:
            return v
    elif hint is type(None):
        if v is None:
            return v
    elif hint not in _KINDS:
        raise TypeError(f"request fields cannot be {hint!r}")
    elif type(v) is hint:
        return v
    raise Invalid(path, f"must be {_KINDS[hint]}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _describe(hint.__origin__)
    if dataclasses.is_dataclass(hint):
        return "an object"
    return _KINDS.get(origin or hint, str(hint))
