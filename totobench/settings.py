"""Typed setting sections: a frozen dataclass per section, its fields the valid keys, its defaults the
only defaults.

    @dataclass(frozen=True)
    class KnnSpec(Settings):
        ks: tuple[int, ...] = field(default=(10, 20), metadata={"min": 1})
        temperature: float = field(default=0.07, metadata={"gt": 0})

    spec = KnnSpec.from_mapping({"ks": [5]}, where="tasks/imagenet-knn.yaml: probe")

`from_mapping` checks every key (an unknown one names the closest valid key), every type (YAML
lists become tuples, integers are accepted where a number is expected, booleans never are) and
every bound in a field's metadata ("min", "max", "gt", "choices"), then calls `check` for rules
that tie fields together. Every failure is one ConfigError line: where, key, value, expectation.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from totobench.errors import ConfigError
from totobench.registry import did_you_mean


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


_NO = object()


def _coerce(value: Any, hint) -> Any:
    """`value` as type `hint`, or _NO when it is not one."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _NO
        inner = typing.get_args(hint)[0]
        items = [_coerce(v, inner) for v in value]
        return _NO if any(i is _NO for i in items) else tuple(items)
    if origin is Literal:
        return value if value in typing.get_args(hint) else _NO
    if hint is type(None):
        return None if value is None else _NO
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is float:  # finite numbers only: nan and inf are never a setting
        if isinstance(value, bool):
            return _NO
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return _NO
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        return _NO
    if hint is str:
        return value if isinstance(value, str) else _NO
    return value


def _bound_problem(value: Any, meta: dict) -> str | None:
    """What is wrong with `value` (or each item of a tuple) against the field's bounds, or None."""
    items = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and meta.get("nonempty") and not value:
        return "a non-empty list"
    for item in items:
        if item is None or isinstance(item, (str, bool)):
            continue
        if "min" in meta and item < meta["min"]:
            return f">= {meta['min']}"
        if "max" in meta and item > meta["max"]:
            return f"<= {meta['max']}"
        if "gt" in meta and not item > meta["gt"]:
            return f"> {meta['gt']}"
        if "lt" in meta and not item < meta["lt"]:
            return f"< {meta['lt']}"
    return None


class Settings:
    """Base of the typed sections; subclasses are frozen dataclasses."""

    @classmethod
    def from_mapping(cls, data: Any, where: str, sources: dict[str, str] | None = None) -> "Settings":
        """Build from a YAML mapping; ConfigError (prefixed by `where`) on any bad key or value.

        `sources` maps a key to where its value came from when that is not `where`'s file (e.g.
        "--set imagenet.probe.epochs=ten"); the error then names that source first."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in data.items():
            here = f"{sources[key]}: {where}" if sources and key in sources else where
            if key not in fields:
                raise ConfigError(f"{here}: unknown key {key!r}{did_you_mean(str(key), fields)}")
            out = _coerce(value, hints[key])
            if out is _NO:
                raise ConfigError(f"{here}.{key}: expected {_describe(hints[key])}, got {value!r}")
            problem = _bound_problem(out, dict(fields[key].metadata))
            if problem:
                raise ConfigError(f"{here}.{key}: expected {problem}, got {value!r}")
            choices = fields[key].metadata.get("choices")
            if choices and out not in choices:
                raise ConfigError(f"{here}.{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
            values[key] = out
        spec = cls(**values)
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        """Rules that tie fields together; raise ConfigError naming `where` and the keys."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value
