"""Typed configs built from plain dicts: unknown keys rejected with a "did you mean", types checked, and
values validated in each config's ``__post_init__``. Also dotted ``key=value`` overrides on raw dicts.

Every component defines its own dataclass next to its code; this module only knows how to fill them.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from cpt.errors import RecipeError

T = TypeVar("T")


class ConfigValueError(ValueError):
    """Raised by a config's ``__post_init__``; ``key`` is the field at fault, relative to that config."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigValueError(key, message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigValueError(key, message)


def field(default: Any = dataclasses.MISSING, *, doc: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line ``doc`` that error messages can show."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"doc": doc})


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def suggest(word: str, options: typing.Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and value not in get_args(tp):
            # YAML 1.1 reads yes/no/on/off as booleans: `mixed_precision: no` arrives as False. Take the word
            # back when the Literal allows one of its spellings.
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((a for a in get_args(tp) if isinstance(a, str) and a.lower() in words), value)
        if value not in get_args(tp):
            hint = suggest(str(value), [str(a) for a in get_args(tp)])
            raise RecipeError(f"{path}: {value!r} is not allowed{hint}; expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(get_args(tp)[0], v, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return {str(k): _convert(get_args(tp)[1], v, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept any string Python reads as a number.
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise RecipeError(f"{path}: expected a finite number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a dict, checking keys, types and the class's own validation.

    Raises:
        RecipeError: naming the key path, what was wrong and what is allowed.
    """
    where = path or "recipe"
    # A field named after a Python keyword is spelled with a trailing underscore ("from_" is key "from").
    fields = {_key_of(f.name): f for f in dataclasses.fields(cls)}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with keys {', '.join(fields)}, got {data!r}")
    for key in data:
        if key not in fields:
            raise RecipeError(
                f"{_join(path, str(key))}: unknown key{suggest(str(key), fields)}; allowed: {', '.join(fields)}"
            )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[f.name] = _convert(hints[f.name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            doc = f.metadata.get("doc", "")
            raise RecipeError(f"{_join(path, name)}: required key is missing" + (f" ({doc})" if doc else ""))
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        raise RecipeError(f"{_join(path, e.key)}: {e}") from None


def _key_of(field_name: str) -> str:
    stem = field_name[:-1]
    return stem if field_name.endswith("_") and keyword.iskeyword(stem) else field_name


def to_dict(config: Any) -> Any:
    """A config as plain dicts and lists with recipe keys, ready for YAML or JSON."""
    if not dataclasses.is_dataclass(config):
        return config
    return dataclasses.asdict(config, dict_factory=lambda items: {_key_of(k): v for k, v in items})


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a raw recipe dict (values parsed as YAML).

    A path segment into a list is an index (``stages.1.steps=20``) or the ``name`` of an element
    (``stages.cpt.steps=20``). Missing mappings are created, so unknown keys surface in ``build``.
    """
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}': expected key=value, e.g. train.max_steps=20")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            raise RecipeError(f"override '{item}': the value is not valid YAML: {getattr(e, 'problem', e)}") from None
        keys = dotted.strip().split(".")
        if not all(keys):
            raise RecipeError(f"override '{item}': empty key segment in '{dotted}'")
        node: Any = raw
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                index = _list_index(node, key, where)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    # An empty section (`checkpoint:` reads as null) is filled like a missing one.
                    if node.get(key) is None:
                        node[key] = {}
                    node = node[key]
            else:
                raise RecipeError(f"override '{item}': '{'.'.join(keys[:i])}' is a value, not a mapping or list")
    return raw


def _list_index(items: list, key: str, where: str) -> int:
    if re.fullmatch(r"-?[0-9]+", key):
        index = int(key)
        if not -len(items) <= index < len(items):
            raise RecipeError(f"override {where}: index {index} out of range (list has {len(items)} entries)")
        return index
    # One name per element (None for elements without one) so a name's position is the element's index.
    names = [x.get("name") if isinstance(x, dict) else None for x in items]
    if key in names:
        return names.index(key)
    named = [str(n) for n in names if n is not None]
    raise RecipeError(f"override {where}: no entry named '{key}'{suggest(key, named)}; "
                      f"use an index 0..{len(items) - 1} or one of {named}")
