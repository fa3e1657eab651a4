"""Typed configuration: dataclasses filled from YAML presets and dotted ``key=value`` overrides.

Every component owns a plain ``@dataclass`` (fields with type hints and a one-line comment; checks in
``__post_init__`` raising ``ValueError``). This module turns nested mappings into those dataclasses, strictly:

* an unknown key is an error, with a "did you mean" when a field name is close;
* a value of the wrong type is an error naming the dotted key, the value and what the field accepts;
* a ``__post_init__`` check that fails is reported under the dotted key of the dataclass that raised it.

Presets may inherit: a top-level ``_base_: other.yaml`` (or a list of them) is loaded first, relative to the
preset's folder, and the preset is merged over it. ``load_config`` applies files in order, then overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key, the value and what is allowed."""


# ----------------------------------------------------------------------------------------------- conversion


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple, dict):
        return repr(tp).replace("typing.", "")
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", repr(tp))


def _fail(path: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"{path or '<root>'}: got {value!r} ({type(value).__name__}); expected {_describe(tp)}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the type hint ``tp``, converting containers and nested dataclasses."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(path, value, tp)
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(
            f"{path}: got {value!r}; allowed: {', '.join(repr(a) for a in args)}{extra}"
        )
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _fail(path, value, tp)
        item = args[0] if args else Any
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(path, value, tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: got {len(value)} items {list(value)!r}; expected {len(args)} ({_describe(tp)})")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _fail(path, value, tp)
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, f"{path}.<key>"): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _fail(path, value, tp)
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(path, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(path, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. name=123 on the command line
            return str(value)
        raise _fail(path, value, tp)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _fail(path, value, tp)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise _fail(path, data, cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key{hint} ({cls.__name__} accepts: {', '.join(sorted(fields))})"
            )
        kwargs[key] = _convert(value, hints[key], where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        head = msg.split(":", 1)[0].strip()
        if head in fields:  # the check named its own field: report it under the full dotted key
            raise ConfigError(f"{path}.{msg}" if path else msg) from e
        raise ConfigError(f"{path or cls.__name__}: {msg}") from e


def architecture_config(name: str, role: str, overrides: Any, key: str) -> tuple[Any, Any]:
    """``(architecture, typed config)`` of the registered architecture or preset ``name`` of ``role``
    (``"denoiser"``, ``"autoencoder"``), with ``overrides`` (a mapping of its fields, or the whole typed config)
    over its fields, checked like any config: an unknown name, another role, an unknown field, a wrong type or a
    failed check is a ``ValueError`` naming ``key``."""
    from models.registry import list_architectures, resolve

    try:
        arch, base = resolve(name)
    except KeyError as e:
        raise ValueError(f"{key}: {e.args[0]}") from None
    if arch.role != role:
        raise ValueError(f"{key}: {name!r} is registered as an architecture of role {arch.role!r}, not of role "
                         f"{role!r}; {role} architectures: {', '.join(list_architectures(role))}")
    return arch, with_overrides(base, overrides, key)


def with_overrides(base: Any, overrides: Any, key: str) -> Any:
    """``base`` (a typed config) with ``overrides`` over its fields (a mapping, or a whole config of the same type,
    which replaces it), checked like any config (errors are ``ValueError`` naming ``key`` and the field)."""
    if isinstance(overrides, type(base)):  # Python callers may give the whole typed config
        return overrides
    if not overrides:
        return base
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{key}: got {overrides!r}; expected a mapping of {type(base).__name__} fields")
    try:
        return from_dict(type(base), {**to_dict(base), **overrides}, key)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def check_field_types(obj: Any) -> None:
    """Type-check every field of dataclass ``obj`` against its hints (converting as :func:`from_dict` does, e.g.
    int → float), for dataclasses that may also be built directly in Python. Call it from ``__post_init__``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            converted = _convert(value, hints[f.name], f.name)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        object.__setattr__(obj, f.name, converted)


def to_dict(obj: Any) -> Any:
    """A dataclass (tree) as plain YAML-able Python: dicts, lists, scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=110)


def save_config(obj: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(obj))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ files, overrides


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two mappings; ``override`` wins; nested mappings merge, everything else is replaced."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_preset(name: str | os.PathLike) -> Path:
    """A preset name (``quickstart``) or a path to a YAML file → the file's path; errors list the presets."""
    p = Path(name)
    if p.is_dir():
        raise ConfigError(f"config {str(name)!r}: is a directory; give a YAML file or a preset name")
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    available = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(str(name), available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config {str(name)!r}: no such file, and no preset of that name in {CONFIG_DIR}.{hint} "
                      f"Presets: {', '.join(available) or '(none)'}")


def load_yaml(path: str | os.PathLike, _seen: Optional[set[Path]] = None) -> dict[str, Any]:
    """Read a YAML preset, following ``_base_`` inheritance."""
    path = resolve_preset(path)
    seen = set() if _seen is None else _seen
    real = path.resolve()
    if real in seen:
        raise ConfigError(f"{path}: '{BASE_KEY}' inheritance loops back to this file")
    seen.add(real)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save the "
                          "YAML file as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: dict[str, Any] = {}
    for b in bases:
        base_path = (path.parent / b) if not Path(b).is_absolute() else Path(b)
        if not base_path.exists():
            base_path = resolve_preset(b)
        merged = merge(merged, load_yaml(base_path, seen))
    return merge(merged, data)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["data.batch_size=64", "run.name=x"]`` → nested dict; values parsed as YAML (``[1,2]``, ``true``, ``null``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. data.batch_size=64")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} was already given a plain value")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(
    cls: type[T],
    files: Sequence[str | os.PathLike] = (),
    overrides: Sequence[str] = (),
    defaults: Optional[Mapping[str, Any]] = None,
) -> T:
    """Build ``cls`` from ``defaults``, then each YAML file in order, then dotted overrides; validate all."""
    data: dict[str, Any] = dict(defaults or {})
    for f in files:
        data = merge(data, load_yaml(f))
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)

