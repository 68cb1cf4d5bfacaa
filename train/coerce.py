"""YAML values checked and coerced against a dataclass field's annotation (train/config.py's
sections use it for every field, so a section built in code is checked like one read from YAML)."""
from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any, Mapping

from model.config import ConfigError

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def describe(tp) -> str:
    """The annotation in the words of an error message: 'int or null', 'list of str'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return f"list of {describe(args[0]) if args else 'values'}"
        return f"list of {len(args)} {' / '.join(sorted({describe(a) for a in args}))}"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp, name: str):
    """`value` as type `tp`, or a ConfigError. Strict on purpose: bool is not an int and 3.0
    is not an int (a silently truncated number is worse than an error); ints pass as floats,
    and numeric text passes as a float because YAML 1.1 reads `3e-4` as a string."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, name)
            except ConfigError:
                pass
    elif origin in (tuple, list):
        return _coerce_seq(value, tp, name)
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    else:
        return value  # an annotation we do not model: the dataclass checks it itself
    raise ConfigError(f"{name}: expected {describe(tp)}, got {value!r}")


def _coerce_seq(value, tp, name: str):
    """Lists/tuples element by element; a lone value stands for a one-element list."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    variadic = origin is list or (len(args) == 2 and args[1] is Ellipsis)
    if not isinstance(value, (list, tuple)):
        if not variadic or value is None or isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected {describe(tp)}, got {value!r}")
        value = [value]
    if not variadic and len(value) != len(args):
        raise ConfigError(f"{name}: expected {describe(tp)}, got {list(value)!r}")
    elem = [args[0]] * len(value) if variadic else args
    out = [coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, elem))]
    return tuple(out) if origin is tuple else out


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """Resolved annotation of each dataclass field (annotations are strings here)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
