"""Typed configs from YAML plus `section.key=value` overrides, checked with the key named.

The loader knows no stage: it builds whatever tree of frozen dataclasses it is given from
their type hints (`build`), and reads each field's meaning from the comment that follows
it in the dataclass source (`field_docs`), so `cm3leon config keys` and docs/config.md are
generated from the dataclasses and never written twice. The sections themselves (and
their checks) are the sibling modules of this package.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

import yaml

from cm3leon_jax import storage


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or impossible."""


# --- reading ---------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last one
    silently, so a repeated `lr:` would hide the value the user meant)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base loader names an unhashable key itself
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given "
                                  "twice in one mapping; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: storage.PathLike) -> dict:
    """The mapping of sections in a YAML file (local or a URL)."""
    path = storage.path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:  # syntax errors and Python-object tags alike: one line
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{line} is not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` with each `section.key=value` set (the value read as YAML)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        section, _, field = key.partition(".")
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        try:
            raw.setdefault(section, {})[field] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or e})") from None
    return raw


def migrate(raw: dict, renamed: dict) -> dict:
    """Move keys that were renamed, {(section, old): (section, new)}, to their new names
    (files written before the rename load); an error only when both are set and differ."""
    for (section, key), (new_section, new_key) in renamed.items():
        values = raw.get(section)
        if not (isinstance(values, dict) and key in values):
            continue
        old = values[key]
        raw = {**raw, section: {k: v for k, v in values.items() if k != key}}
        if old is None:
            continue
        target = raw.get(new_section)
        target = dict(target) if isinstance(target, dict) else {}
        if target.get(new_key) not in (None, old):
            raise ConfigError(f"{section}.{key}={old!r} (the old name of {new_section}.{new_key}) "
                              f"and {new_section}.{new_key}={target[new_key]!r} disagree")
        raw = {**raw, new_section: {**target, new_key: old}}
    return raw


def build(cls, raw: Any, where: str = ""):
    """An instance of dataclass `cls` from a mapping, every value coerced to its field's type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, key: str):
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        return build(typ, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(typ)
        if dataclasses.is_dataclass(inner):
            required = [f.name for f in dataclasses.fields(inner)
                        if f.default is dataclasses.MISSING]
            for i, item in enumerate(value):
                missing = [n for n in required if isinstance(item, dict) and n not in item]
                if missing:
                    raise ConfigError(f"{key}[{i}]: missing key {missing[0]!r} "
                                      f"(required: {', '.join(required)})")
        return tuple(_coerce(item, inner, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 6e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(value):  # nan passes every `<= 0` check: refuse it here
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"{key}: unsupported config type {typ}")


# --- checks shared by the sections ------------------------------------------------------

def positive(section: str, obj, *names: str) -> None:
    """Each named field of `obj` (the `section` section) is > 0 or null."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name}={value} must be > 0")


def nonnegative(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ConfigError(f"{section}.{name}={value} must be >= 0")


def fraction(section: str, obj, *names: str) -> None:
    """Each named field is a probability in [0, 1]."""
    for name in names:
        value = getattr(obj, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"{section}.{name}={value} must be in [0, 1]")


# --- writing and describing ---------------------------------------------------------------

def dump_yaml(obj) -> str:
    """A dataclass tree as YAML that `build` reads back to an equal tree."""
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False)


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field: the comment that ends its line in the class source} for a dataclass."""
    source = textwrap.dedent(inspect.getsource(cls))
    docs, name = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
            name = tok.string  # the first name of a class-body line
        elif tok.type == tokenize.COMMENT and name is not None:
            docs.setdefault(name, tok.string.lstrip("#").strip())
        elif tok.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class Key:
    """One documented config key."""
    name: str  # dotted, e.g. `model.d_model`; `sweep.sizes[].name` for list items
    type: str
    default: Any
    doc: str


def _type_name(typ) -> str:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(typ) if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + " | null"
    if origin is tuple:
        return f"list[{_type_name(typing.get_args(typ)[0])}]"
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(typ))
    return getattr(typ, "__name__", str(typ))


def keys(cls, prefix: str = "") -> list[Key]:
    """Every key of a dataclass tree, depth first, with its type, default and meaning."""
    out = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        typ, name = hints[f.name], f"{prefix}{f.name}"
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else dataclasses.MISSING)
        if dataclasses.is_dataclass(typ):
            out += keys(typ, name + ".")
            continue
        out.append(Key(name, _type_name(typ), default, docs[f.name]))
        item = typing.get_args(typ)[0] if typing.get_origin(typ) is tuple else None
        if dataclasses.is_dataclass(item):
            out += keys(item, name + "[].")
    return out


def format_default(value) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return ""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
