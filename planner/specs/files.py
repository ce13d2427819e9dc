"""Reading YAML/JSON spec files into pydantic models, with errors that name
the file and the field (exit code 2)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import difflib
import json

import pydantic
import yaml

from loom.planner.specs.errors import SpecError

Spec = TypeVar("Spec", bound=pydantic.BaseModel)


class StrictModel(pydantic.BaseModel):
    """Spec models reject unknown fields, so a typo is an error, not a default."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


def read_mapping(path: Path) -> dict:
    """Parse a YAML (or JSON, which is YAML) file that must hold a mapping."""
    if not path.is_file():
        raise SpecError(str(path), "<file>", "an existing file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise SpecError(str(path), where, f"valid YAML ({getattr(err, 'problem', err)})") from err
    if not isinstance(data, dict):
        raise SpecError(str(path), "<top level>", "a mapping of fields")
    return data


def read_json(path: Path, what: str) -> object:
    """The parsed JSON in ``path``; a missing file or bad JSON is a SpecError
    naming the file (``what``: what the file should be, for the message)."""
    if not path.is_file():
        raise SpecError(str(path), "<file>", f"an existing {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SpecError(str(path), f"line {error.lineno}", "valid JSON") from None
    except UnicodeDecodeError:
        raise SpecError(str(path), "<file>", "valid JSON (UTF-8 text)") from None


def validate(model: type[Spec], data: dict, source: str, prefix: str = "") -> Spec:
    """``model.model_validate(data)``, turning the first pydantic error into a SpecError."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        # A misspelt field also makes the right one "missing": name the typo.
        errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        field = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
        if first["type"] == "extra_forbidden":
            known = _fields_at(model, first["loc"][:-1])
            close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
            expected = f"no such field; did you mean '{close[0]}'?" if close else f"one of the fields {', '.join(known)}"
            raise SpecError(source, field, expected) from None
        got = None if first["type"] == "missing" else first.get("input")
        raise SpecError(source, field or "<top level>", first["msg"], got) from None


def _fields_at(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into."""
    for part in loc:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
