"""The one validation style of every config: typed dataclasses, every problem in one error, dotted names.

A config is a dataclass (nested dataclasses for sections) whose sections subclass `Section`: its
`problems()` lists what is wrong with the values, named by their dotted path (`optim.lr must be > 0`),
and construction raises one `ConfigError` listing all of them. `build` makes such a dataclass from plain
nested dicts (YAML, JSON) strictly: unknown keys (with a "did you mean" from the known ones), missing
required keys, values that do not convert to the field's type (`convert`: int, float, bool, str, lists,
`Literal` choices, optional values) and out-of-range values are all collected before anything raises.
`set_dotted` applies one `a.b.c=value` override against the same schema. The run config
(`spellm_ds.config.run`), the shard builder's and the loader's configs and `plan`'s inputs all validate this
way; code that receives a validated config does not check it again.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml

from spellm_ds.errors import SpellmError


class ConfigError(SpellmError):
    """One or more problems with a config; `.problems` lists each one."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n{lines}")


class Section:
    """Mixin: `__post_init__` raises one SpellmError listing every problem `problems()` returns."""

    def problems(self) -> list[str]:
        """Return human-readable problems with this section's values (empty when valid)."""
        return []

    def __post_init__(self) -> None:
        found = _choice_problems(self) + self.problems()
        if found:
            raise ConfigError(f"invalid {type(self).__name__}", found)


def _choice_problems(obj: Any) -> list[str]:
    """Problems of fields typed `Literal[...]` (or optional ones) whose value is not one of the choices."""
    out: list[str] = []
    for name, tp in typing.get_type_hints(type(obj)).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if not literals or not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        allowed = [c for lit in literals for c in typing.get_args(lit)]
        if value is None and type(None) in args:
            continue
        if value not in allowed:
            out.append(f"{type(obj).__name__}.{name}={value!r} is not one of {', '.join(map(str, allowed))}")
    return out


def positive(problems: list[str], name: str, value: float | None, allow_zero: bool = False) -> None:
    """Append a problem when `value` is negative (or zero, unless `allow_zero`); None is no value."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        problems.append(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def within(problems: list[str], name: str, value: float, low: float, high: float) -> None:
    """Append a problem when `value` is outside [low, high]."""
    if not low <= value <= high:
        problems.append(f"{name} must be in [{low}, {high}], got {value}")


def choice(problems: list[str], name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """Append a problem when `value` is not one of `choices`."""
    options = tuple(choices)
    if value not in options:
        problems.append(f"{name}={value!r} is not one of {', '.join(map(str, options))}")


_MISSING = object()
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def convert(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML or override value to type `tp`; raise SpellmError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (isinstance(value, str) and value.strip().lower() in {"null", "none", "~"})
        if is_null and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(value, inner[0], name)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise SpellmError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        if not isinstance(value, list | tuple):
            raise SpellmError(f"{name}={value!r} is not a list")
        return [convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if value is None:
        raise SpellmError(f"{name} must not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise SpellmError(f"{name}={value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise SpellmError(f"{name}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SpellmError(f"{name}={value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise SpellmError(f"{name}={value!r} is not a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise SpellmError(f"{name}={value!r} is not a number")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise SpellmError(f"{name}={value!r} is not a string")
    raise SpellmError(f"{name}: unsupported field type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(name: str, known: list[str]) -> str:
    parent, _, leaf = name.rpartition(".")
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {(parent + '.' if parent else '') + close[0]!r}?)" if close else ""
    return f"unknown key {name!r}{hint}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> tuple[Any, bool]:
    """Build dataclass `cls` from a mapping, appending every problem found; return (object, ok).

    When a value is bad, the object is still assembled (bad values replaced by defaults, without
    `__init__`) so the remaining range checks run and report too; then ok is False.
    """
    where = prefix.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where} must be a mapping, got {type(data).__name__}")
        data = {}
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(_unknown(f"{prefix}{key}", list(fields)))
    values: dict[str, Any] = {}
    ok, complete = True, True
    for name, f in fields.items():
        full = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name], sub_ok = build(tp, data.get(name), f"{full}.", problems)
            ok &= sub_ok
            complete &= values[name] is not None
            continue
        if name not in data:
            values[name] = _default(f)
            if values[name] is _MISSING:
                problems.append(f"missing required key {full!r}")
                ok = complete = False
            continue
        try:
            values[name] = convert(data[name], tp, full)
        except SpellmError as exc:
            problems.append(str(exc))
            ok = False
            values[name] = _default(f)
            complete &= values[name] is not _MISSING
    if not complete:
        return None, False
    if ok:
        try:
            return cls(**values), True
        except ConfigError:
            ok = False  # the problems are collected just below, from the partial object
    partial = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(partial, name, value)
    problems.extend(partial.problems())
    return partial, False


def set_dotted(root: type, data: dict[str, Any], key: str, raw: str, problems: list[str]) -> None:
    """Apply one `a.b.c=value` override to nested dicts, checking the path against the dataclass `root`."""
    parts = key.split(".")
    cls: Any = root
    node = data
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            problems.append(f"override {key}={raw}: " + _unknown(".".join(parts[: i + 1]), names))
            return
        tp = _hints(cls)[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                problems.append(f"override {key}={raw}: {key!r} is a section, set one of its keys")
                return
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, cls = child, tp
            continue
        if not last:
            problems.append(f"override {key}={raw}: {'.'.join(parts[: i + 1])!r} is not a section")
            return
        try:
            node[part] = convert(raw, tp, key)
        except SpellmError as exc:
            problems.append(f"override: {exc}")
