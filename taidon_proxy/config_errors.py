"""Config errors in the project's words: key path, file:line, what is allowed (no jargon)."""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import ErrorDetails

from taidon_proxy.errors import ConfigError

MAX_LISTED = 10  # problems shown in one message; the rest are counted
# Synonyms accepted for a recipe's prepare.kind (shown in "allowed" lists).
KIND_SYNONYMS = {"liquibase": "lb"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: the key path, what is wrong, and the YAML line."""

    key: list[str]
    message: str
    line: int | None = None

    def render(self, source: Path) -> str:
        where = f"{source}:{self.line}" if self.line else str(source)
        return f"{where}: {'.'.join(self.key) or '(top level)'}: {self.message}"

    def as_dict(self, source: Path) -> dict[str, Any]:
        return {
            "file": str(source),
            "line": self.line,
            "key": ".".join(self.key),
            "message": self.message,
        }


def config_error(source: Path, problems: list[Problem]) -> ConfigError:
    """One ConfigError for every problem: one line each (the first MAX_LISTED), the rest counted."""
    problems = sorted(problems, key=lambda p: p.line or 0)
    lines = [p.render(source) for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"(and {len(problems) - MAX_LISTED} more)")
    err = ConfigError("\n".join(lines))
    err.problems = [p.as_dict(source) for p in problems]
    return err


# --- YAML lines -------------------------------------------------------------------------------


def line_of(node: Any, key: list[str]) -> int | None:
    """Line (1-based) of the deepest YAML node along a key path (the key's own line)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in key:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if str(k.value) == part), None)
            if pair is None:
                break
            line = pair[0].start_mark.line + 1
            node = pair[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


# --- pydantic errors --------------------------------------------------------------------------


def from_validation(errors: list[ErrorDetails], root: type[BaseModel], node: Any) -> list[Problem]:
    """Each validation error as a Problem: the key as written, a sentence, the allowed values."""
    out = []
    for err in errors:
        key, message = _explain(err, root)
        out.append(Problem(key, message, line_of(node, key)))
    return out


def _explain(err: ErrorDetails, root: type[BaseModel]) -> tuple[list[str], str]:
    raw_loc = [str(p) for p in err["loc"]]
    key = _clean_loc(raw_loc)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        allowed = _fields_at(root, raw_loc[:-1])
        unknown = key[-1] if key else "?"
        hint = ""
        close = difflib.get_close_matches(unknown, allowed, n=1)
        if close:
            hint = f"; did you mean {close[0]}?"
        listed = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return key, f"unknown setting{hint}{listed}"
    if kind == "missing":
        return key, "required, but not set"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = _quoted(str(ctx.get("expected_tags", ""))) or _tags_at(root, raw_loc)
        tags += [f"{s} (same as {t})" for s, t in KIND_SYNONYMS.items() if t in tags]
        field = str(ctx.get("discriminator", "kind")).strip("'")
        if kind == "union_tag_not_found":
            return [*key, field], f"required, but not set; use one of: {', '.join(tags)}"
        choices_text = ", ".join(tags)
        return [*key, field], f"{_show(ctx.get('tag'))} is not allowed; use one of: {choices_text}"
    if kind in ("literal_error", "enum"):
        choices = _quoted(str(ctx.get("expected", "")))
        return key, f"{_show(value)} is not allowed; use one of: {', '.join(choices)}"
    if kind == "value_error":
        return key, str(ctx.get("error", err["msg"])).removeprefix("Value error, ")
    if kind in ("too_short", "too_long"):
        n = ctx.get("min_length" if kind == "too_short" else "max_length")
        word = "at least" if kind == "too_short" else "at most"
        return key, f"needs {word} {n} entr{'y' if n == 1 else 'ies'}"
    bounds = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
              "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}  # fmt: skip
    if kind in bounds:
        name, words = bounds[kind]
        return key, f"must be {words} {ctx.get(name)}, not {_show(value)}"
    wanted = _WANTED.get(kind)
    if wanted is not None:
        return key, f"must be {wanted}, not {_type_of(value)}{_value_suffix(value)}"
    # Anything else: pydantic's sentence, minus its phrasing.
    return key, re.sub(r"^Input should be", "must be", err["msg"])


_WANTED = {
    "string_type": "a string",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "list_type": "a list ([a, b], or one '- item' per line)",
    "path_type": "a path",
}


def _clean_loc(loc: list[str]) -> list[str]:
    """Drop pydantic's discriminator tags ('psql', 'lb' after 'prepare') from an error location."""
    out: list[str] = []
    for part in loc:
        if out and out[-1] == "prepare" and part in ("psql", "lb", "command", "alembic", "django"):
            continue
        out.append(part)
    return out


def _quoted(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text)


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    return str(value) if isinstance(value, int | float | bool) else _type_of(value)


def _type_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _value_suffix(value: object) -> str:
    plain = isinstance(value, str | int | float) and not isinstance(value, bool)
    return f" {value!r}" if plain else ""


def _fields_at(root: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys a model accepts at a location (empty when the location is not a model)."""
    ann: Any = root
    for part in loc:
        ann = _step(ann, part)
        if ann is None:
            return []
    model = _model_of(ann)
    return [] if model is None else [f for f in model.model_fields if f != "source"]


def _step(ann: Any, part: str) -> Any:
    model = _model_of(ann)
    if model is not None:
        field = model.model_fields.get(part)
        return None if field is None else field.annotation
    ann = _unwrap(ann)
    origin = get_origin(ann)
    if origin is dict:
        return get_args(ann)[1]
    if origin is list:
        return get_args(ann)[0]
    if origin in (typing.Union, types.UnionType):  # a discriminated union: part is the tag
        for member in get_args(ann):
            m = _model_of(member)
            kind = m.model_fields.get("kind") if m is not None else None
            if kind is not None and part in get_args(kind.annotation):
                return m
    return None


def _tags_at(root: type[BaseModel], loc: list[str]) -> list[str]:
    """The `kind` values of the discriminated union at a location."""
    ann: Any = root
    for part in loc:
        ann = _step(ann, part)
        if ann is None:
            return []
    tags: list[str] = []
    for member in get_args(_unwrap(ann)):
        m = _model_of(member)
        kind = m.model_fields.get("kind") if m is not None else None
        if kind is not None:
            tags += [str(t) for t in get_args(kind.annotation)]
    return tags


def _unwrap(ann: Any) -> Any:
    while get_origin(ann) is typing.Annotated:
        ann = get_args(ann)[0]
    return ann


def _model_of(ann: Any) -> type[BaseModel] | None:
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    args = [a for a in get_args(ann) if a is not type(None)]
    if get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        return _model_of(args[0])
    return None
