"""Run configuration: nested dataclasses read from TOML and overridden with ``--set a.b=value``."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import math
import re
import tokenize
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from maskattn.errors import SettingError, SettingTypeError, UnknownSettingError


class _NoneWord(str):
    """``none`` / ``null`` written in a ``--set``: None for a setting that may be None, else the word itself
    (``data.documents=none`` is one of that setting's values)."""


class _PointWord(str):
    """A number written with nothing before or after its point in a ``--set`` (``.5``, ``5.``), which TOML
    refuses: a float for a float setting, else the text itself."""


class _Written(str):
    """A ``--set`` value that TOML reads as a number or a switch (``2024``, ``true``), kept as typed: the text
    for a text setting (``out=2024`` names a directory), else the TOML value, ``.value``."""

    value: Any


_POINT_NUMBER = re.compile(r"[+-]?(\d+\.|\.\d+)([eE][+-]?\d+)?")


def _parse_value(text: str) -> Any:
    """A TOML literal (``3e-4``, ``true``, ``[1, 2]``, ``"x"``), ``none``, ``.5``, or the bare text as a string."""
    if text.lower() in ("none", "null"):
        return _NoneWord(text)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return _PointWord(text) if _POINT_NUMBER.fullmatch(text) else text
    if not isinstance(value, (int, float)):  # (bool is an int)
        return value
    written = _Written(text)
    written.value = value
    return written


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field's type annotation, converting int -> float and list -> tuple."""
    origin = typing.get_origin(annotation)
    if isinstance(value, _PointWord) and annotation in (float, str):
        return float(value) if annotation is float else str(value)
    if isinstance(value, _Written):
        takes_text = annotation is str or (origin in (typing.Union, types.UnionType)
                                           and str in typing.get_args(annotation))
        value = str(value) if takes_text else value.value
    if isinstance(value, _NoneWord):
        takes_none = annotation is Any or (origin in (typing.Union, types.UnionType)
                                           and type(None) in typing.get_args(annotation))
        value = None if takes_none else str(value)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except (TypeError, ValueError):
                continue
        raise SettingTypeError(f"{where}: expected {annotation}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingTypeError(f"{where}: expected a list, got {value!r}")
        kinds = typing.get_args(annotation)
        if len(kinds) == 2 and kinds[1] is Ellipsis:  # tuple[T, ...]: any length
            kinds = (kinds[0],) * len(value)
        if len(value) != len(kinds):  # else zip would drop the extra values without a word
            raise SettingTypeError(f"{where} must be a list of {len(kinds)} values, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, kinds, strict=True))
    if origin is list:
        if not isinstance(value, list):
            raise SettingTypeError(f"{where}: expected a list, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (isinstance(annotation, type) and not isinstance(value, annotation)) or (
        annotation is int and isinstance(value, bool)
    ):
        raise SettingTypeError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def update(obj: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with nested ``values`` applied; unknown keys are errors."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            guess = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UnknownSettingError(f"unknown setting '{where}'{guess}; known here: {sorted(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SettingTypeError(f"{where} is a section; set its fields, e.g. {where}.<name>=...")
            changes[key] = update(current, value, f"{where}.")
        elif isinstance(value, dict) and value and hints[key] is not Any and typing.get_origin(hints[key]) is not dict:
            raise UnknownSettingError(f"unknown setting '{where}.{next(iter(value))}': {where} is a setting, not a "
                                      f"section; set it as {where}=...")
        else:
            changes[key] = _coerce(value, hints[key], where)
    try:
        return dataclasses.replace(obj, **changes)
    except SettingError as e:  # "keep must be ..." from the section's __post_init__ -> "train.keep must be ..."
        raise type(e)(str(e) if str(e).startswith(prefix) else f"{prefix}{e}") from e  # (named already: as is)
    except ValueError as e:  # a section's own check (e.g. a model's shape), named after the section
        raise SettingError(f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from e


def overrides(assignments: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "model.layers=2"]`` -> ``{"train": {"lr": 3e-4}, "model": {"layers": 2}}`` (a number
    or switch kept with its text as typed, which :func:`update` gives a text setting)."""
    nested: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise SettingError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        if not key.strip():
            raise UnknownSettingError(f"--set {item!r}: no setting named before '='; write KEY=VALUE, e.g. "
                                      "train.lr=3e-4")
        *path, last = key.strip().split(".")
        if not all(part.strip() for part in (*path, last)):  # else "unknown setting 'train.'" of `train..lr`
            raise UnknownSettingError(f"--set {item!r}: the setting {key.strip()!r} has an empty part (a dot at "
                                      "either end, or two in a row); write SECTION.NAME, e.g. train.lr")
        node = nested
        for depth, part in enumerate(path):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # an earlier --set gave this prefix a value
                where = ".".join(path[: depth + 1])
                raise SettingTypeError(f"--set {item!r}: {where} was set to a value by an earlier --set, but {where} "
                                       f"is a section; set its fields only, e.g. {where}.<name>=...")
        node[last] = _parse_value(text.strip())
    return nested


def load(base: Any, path: str | Path | None = None, assignments: list[str] | None = None) -> Any:
    """``base`` updated by a TOML file and then by ``--set`` assignments."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SettingError(f"--config {path}: {'a directory' if path.is_dir() else 'no such file'}, "
                               "expected a TOML file of settings")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark (Windows editors)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SettingError(f"--config {path}: not a valid TOML file: {e}") from e
        try:
            base = update(base, values)
        except SettingError as e:  # the file holds the setting, not a --set: name it
            raise type(e)(f"--config {path}: {e}") from e
    return update(base, overrides(assignments or []))


def get(obj: Any, key: str) -> Any:
    """The value of the dotted setting ``key`` (``"model.d_model"``) of a configuration dataclass."""
    for name in key.split("."):
        obj = getattr(obj, name)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def comments(cls: type) -> dict[str, str]:
    """The comment written after each field of dataclass ``cls`` (and its bases) in its source:
    ``lr: float = 5e-4  # peak learning rate`` -> ``{"lr": "peak learning rate"}``."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment on a redefined field wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (e.g. built in a REPL): no comments
            continue
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                field = _FIELD.match(token.line)
                if field and field.end(1) < token.start[1]:
                    found[field.group(1)] = token.string.lstrip("#").strip()
    return found


_FIELD = re.compile(r"^\s+([A-Za-z_]\w*)\s*:")


def describe(obj: Any, prefix: str = "") -> list[str]:
    """``key = value  # comment`` lines for ``--show-config``, from the dataclass fields and the
    comment after each field in its source. The lines are a TOML file that ``--config`` reads back (a
    setting whose value is None, which TOML cannot write, is a comment line: uncomment it to set it)."""
    lines = []
    notes = comments(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, f"{prefix}{f.name}.")
        else:
            note = notes.get(f.name)
            line = f"{prefix}{f.name} = {_toml(value)}" if value is not None else f"# {prefix}{f.name} = None"
            lines.append(line + (f"  # {note}" if note else ""))
    return lines


def _toml(value: Any) -> str:
    """``value`` written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # a literal string where it can be one: it reads as Python's repr does
        plain = "'" not in value and not any(ord(c) < 32 or ord(c) == 127 for c in value)
        return f"'{value}'" if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)
