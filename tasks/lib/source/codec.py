"""The source model as plain JSON (`to_json`, keys sorted) and back (`from_json`, typed)."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Literal, TypeVar


def to_json(value: object) -> Any:
    """Plain data (dicts, lists, str, int, bool, None) with sorted keys."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in sorted(fields(value), key=lambda f: f.name)}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in sorted(value.items())}
    return value


T = TypeVar("T")


def from_json(cls: type[T], data: Any) -> T:
    """Rebuild a dataclass (e.g. SystemDescription) from `to_json` output."""
    return typing.cast(T, _from_json(cls, data, "$"))


def _from_json(tp: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}")
        hints = typing.get_type_hints(tp)
        values = {}
        for f in fields(tp):
            if f.name not in data:
                raise ValueError(f"{where}.{f.name}: missing")
            values[f.name] = _from_json(hints[f.name], data[f.name], f"{where}.{f.name}")
        return tp(**values)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_json(arg, data, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or f"{where}: unexpected null")
    if origin is Literal:
        if data not in typing.get_args(tp):
            raise ValueError(f"{where}: {data!r} is not one of {typing.get_args(tp)}")
        return data
    if origin is tuple:
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list")
        item = typing.get_args(tp)[0]
        return tuple(_from_json(item, v, f"{where}[{i}]") for i, v in enumerate(data))
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object")
        value_type = typing.get_args(tp)[1]
        return {str(k): _from_json(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if tp is bool:
        if not isinstance(data, bool):
            raise ValueError(f"{where}: expected true or false")
        return data
    if tp is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise ValueError(f"{where}: expected an integer")
        return data
    if tp is str:
        if not isinstance(data, str):
            raise ValueError(f"{where}: expected a string")
        return data
    raise ValueError(f"{where}: cannot read type {tp!r}")
