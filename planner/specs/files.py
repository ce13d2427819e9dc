"""Reading YAML/JSON spec files into pydantic models, with errors that name
the file and the field (exit code 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar, get_args

import difflib
import json
import re

import pydantic
import yaml

from loom.planner.specs.errors import WHOLE_FILE, SpecError

Spec = TypeVar("Spec", bound=pydantic.BaseModel)


def why_missing(*candidates: Path) -> str:
    """Why none of ``candidates`` (where a file was looked for) is a file, as a message says it."""
    return "it is a folder" if any(path.is_dir() for path in candidates) else "no such file"


def count(maximum: int, minimum: int = 1) -> object:
    """An integer field in [minimum, maximum]: a YAML ``true`` or ``"8"`` is
    not a number (pydantic's strict mode), and no cluster or job has more
    than ``maximum`` (the limit the error message states)."""
    return Annotated[int, pydantic.Field(strict=True, ge=minimum, le=maximum)]


def rate(maximum: float, minimum: float = 0.0, inclusive_minimum: bool = False) -> object:
    """A finite number in (minimum, maximum] ([minimum, ...] when inclusive);
    integers are numbers too, booleans and strings are not."""
    low = {"ge": minimum} if inclusive_minimum else {"gt": minimum}
    return Annotated[float, pydantic.Field(strict=True, le=maximum, allow_inf_nan=False, **low)]


class StrictModel(pydantic.BaseModel):
    """Spec models reject unknown fields, so a typo is an error, not a default."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


# No spec, profile or plan loom reads is anywhere near this large or deep.
MAX_FILE_BYTES = 256 * 2**20
# YAML specs (jobs, clusters) are hand-written: a cluster naming 10,000 hosts
# is ~200 KB. PyYAML parses ~3 MB/s, so this bounds a read to about a second.
MAX_YAML_BYTES = 4 * 2**20
MAX_NESTING = 64


def _text(path: Path, what: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of ``path``, which must be a file of at most ``max_bytes``."""
    if path.is_dir():
        raise SpecError(str(path), WHOLE_FILE, f"a {what}, not a folder")
    if not path.is_file():
        raise SpecError(str(path), WHOLE_FILE, f"an existing {what}")
    if path.stat().st_size > max_bytes:
        raise SpecError(str(path), "<file>", f"a {what} of at most {max_bytes // 2**20} MiB", f"{path.stat().st_size:,} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(str(path), f"byte {error.start}", f"a {what} in UTF-8 text") from None
    except OSError as error:
        raise SpecError(str(path), "<file>", f"a readable {what} ({error.strerror or error})") from None


# The most values a file may expand to, YAML aliases counted each time they
# appear: a measured links profile of 4,096 GPUs holds two 4,096^2 matrices
# (2^25 numbers); a "billion laughs" of nested aliases expands past any limit.
MAX_VALUES = 2**26


class _TooLarge(Exception):
    pass


def _check_shape(value: object, path: Path, what: str) -> None:
    """Raise SpecError if ``value`` nests deeper than MAX_NESTING or expands
    (aliases counted each time they appear) to more than MAX_VALUES values.
    Shared lists and mappings are measured once, so a YAML bomb costs no
    more to refuse than its own lines."""
    measured: dict[int, tuple[int, int]] = {}

    def shape(item: object, level: int) -> tuple[int, int]:  # (depth, values)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            return 1, 1
        if id(item) in measured:
            return measured[id(item)]
        if level >= MAX_NESTING and len(children):  # its values would lie deeper than allowed
            raise _TooLarge(f"{what} nested at most {MAX_NESTING} levels deep")
        depth, values = 1, 1
        for child in children:
            child_depth, child_values = shape(child, level + 1)
            depth, values = max(depth, child_depth + 1), values + child_values
            if values > MAX_VALUES:
                raise _TooLarge(f"a {what} of at most {MAX_VALUES:,} values (YAML aliases counted each time they appear)")
        measured[id(item)] = depth, values
        return depth, values

    try:
        shape(value, 1)
    except _TooLarge as error:
        raise SpecError(str(path), WHOLE_FILE, str(error)) from None


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is
    an error (YAML 1.2 requires unique keys; PyYAML silently keeps the last).
    Keys a merge (``<<: *defaults``) brings in may be given again: that is
    what a merge is for."""

    def construct_mapping(self, node, deep=False):
        own = {id(key_node) for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge"}
        self.flatten_mapping(node)
        seen = set()
        for key_node, _ in node.value:
            if id(key_node) not in own:
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float)) and key in seen:  # names, and numbers (EP sizes of moe_load_imbalance)
                raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's integers and floats (its core schema): PyYAML reads YAML 1.1,
# where 010 is octal 8, 0x10, 1_6 and 1:20 are integers (16, 16, 80), 1_0.5
# and 1:20.5 floats, and 4e2 and 1e12 strings, none of them what a user
# writing a node count or a bandwidth means. Integers are decimal (leading
# zeros allowed, as 1.2 reads them); other digit strings stay strings, which
# the fields refuse.
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"), list("-+0123456789."))


def read_mapping(path: Path, what: str = "YAML file") -> dict:
    """Parse a YAML (or JSON, which is YAML) file that must hold a mapping."""
    text = _text(path, what, MAX_YAML_BYTES)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as duplicate:
        raise SpecError(str(path), duplicate.key, f"the field once (again at line {duplicate.line})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise SpecError(str(path), where, f"valid YAML ({getattr(err, 'problem', err)})") from None
    except RecursionError:
        raise SpecError(str(path), "<file>", f"YAML nested at most {MAX_NESTING} levels deep") from None
    if not isinstance(data, dict):
        raise SpecError(str(path), "<top level>", "a mapping of fields")
    _check_shape(data, path, "YAML")
    return data


def read_json(path: Path, what: str) -> object:
    """The parsed JSON in ``path``; a missing file or bad JSON is a SpecError
    naming the file (``what``: what the file should be, for the message)."""
    text = _text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SpecError(str(path), f"line {error.lineno}", "valid JSON") from None
    except RecursionError:
        raise SpecError(str(path), "<file>", f"JSON nested at most {MAX_NESTING} levels deep") from None
    except ValueError as error:  # e.g. an integer of more than 4,300 digits
        raise SpecError(str(path), "<file>", "valid JSON with numbers of at most 4,300 digits" if "digits" in str(error) else f"valid JSON ({error})") from None
    _check_shape(data, path, "JSON")
    return data


def validate(model: type[Spec], data: dict, source: str, prefix: str = "", flags: dict[str, str] | None = None, strict: bool = False) -> Spec:
    """``model.model_validate(data)``, turning pydantic's errors into one
    SpecError naming every field that is wrong (once each); a top-level
    field in ``flags`` came from that command-line flag and is named by it.
    ``strict``: ``data`` is parsed JSON that loom wrote, so no value is
    coerced ("32" is not 32); validated as JSON, where arrays stand for tuples."""
    try:
        if strict:
            return model.model_validate_json(json.dumps(data), strict=True)
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        problems, seen = [], set()
        errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
        located = [".".join(str(part) for part in (prefix, *_field_path(data, e["loc"])) if part != "") for e in errors]
        # A misspelt field also makes the right one "missing": name the typo first.
        for error, field in zip(errors, located):
            loc = _field_path(data, error["loc"])
            field = field or "<top level>"
            if error["type"] == "literal_error" and any(other.startswith(field + ".") for other in located):
                continue  # a union's other branch ("auto") when the list itself has the problem
            if flags and loc and loc[0] in flags:
                field = ".".join([flags[loc[0]], *map(str, loc[1:])])
            if field in seen or (error["type"] == "missing" and any(f.startswith(field + ".") for f in seen)):
                continue
            seen.add(field)
            if error["type"] == "extra_forbidden":
                known = _fields_at(model, loc[:-1])
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                problems.append((field, f"no such field; did you mean '{close[0]}'?" if close else f"one of the fields {', '.join(known)}", None))
            else:
                problems.append((field, _expected(error), None if error["type"] == "missing" else error.get("input")))
        raise SpecError.of(source, problems) from None


def _expected(error: dict) -> str:
    """pydantic's message as what was expected: 'Input should be a valid
    integer' -> 'a valid integer'; 'Value error, X' -> 'X'."""
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "a mapping of fields"
    if error["type"] == "too_short":
        return f"at least {error['ctx']['min_length']} item(s)"
    message = error["msg"]
    for prefix in ("Input should be ", "Value error, "):
        message = message.removeprefix(prefix)
    return "a value" if error["type"] == "missing" else message


def _field_path(data: object, loc: tuple) -> tuple:
    """pydantic's error location without the union members it names
    ('constrained-int', 'str', 'list[...]', "literal['auto']", a model's
    name): a part is a field where the input has it; one the input lacks is
    the missing field when last, else a union member."""
    path, node = [], data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif i < len(loc) - 1 or not isinstance(node, dict):
            continue  # a union member: the value is still ``node``
        path.append(part)
    return tuple(path)


def _fields_at(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into, through
    lists, dicts and optional fields (``node_overrides.0``)."""
    for part in loc:
        if isinstance(part, int) or str(part) not in model.model_fields:
            continue  # a list index or a dict key: the model inside the list or dict
        nested = _model_in(model.model_fields[str(part)].annotation)
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _model_in(annotation) -> type[pydantic.BaseModel] | None:
    """The pydantic model an annotation holds (itself, or inside list[...],
    dict[..., ...] or ... | None), or None."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _model_in(arg)) is not None), None)
