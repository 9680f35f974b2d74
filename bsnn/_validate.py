"""Shared validation and YAML helpers of every stage's config dataclass (imports nothing of bsnn but errors).

``_check`` raises :class:`~bsnn.errors.ConfigError`; ``from_dict`` builds (and validates) any config dataclass
from a nested dict with type coercion; ``yaml_load`` / ``read_yaml_mapping`` / ``apply_overrides`` are the YAML
and ``key=value`` override machinery that :mod:`bsnn.config` and :mod:`bsnn.hardware.config` share.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from bsnn.errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e30`` / ``1e-3`` are numbers, not strings (YAML 1.1 wanted
    ``1.0e+30``); ``.inf`` / ``.nan`` stay floats (and are refused where a finite number is needed)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text safely (no code, plain data only) with YAML 1.2 floats (``1e30`` is a number)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return _number(value) and math.isfinite(value)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML value to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value) if (tp is tuple or origin is tuple) else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _from_dict(cls: type, d: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def from_dict(d: dict | None, cls: type) -> Any:
    """Build a config dataclass ``cls`` from a nested dict, validating it."""
    cfg = _from_dict(cls, d or {})
    cfg.validate()
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``"a.b=value"`` into ``(["a", "b"], value)``; the value is parsed as YAML (``3`` -> int)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict ``d`` with dotted ``key=value`` overrides applied."""
    out = copy.deepcopy(d)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {text!r}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def read_yaml_mapping(path: str | os.PathLike, what: str, hint: str) -> dict:
    """Read a YAML file that must hold a mapping; errors name the file (``what``) and say what to do (``hint``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} not found; {hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {str(p)!r} is not a text file (not UTF-8); {hint}") from None
    except OSError as e:
        raise ConfigError(f"{what} {str(p)!r} cannot be read ({e.strerror or e}); {hint}") from None
    try:
        d = yaml_load(text) or {}
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {msg}; {hint}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of sections, got {type(d).__name__}")
    return d
