"""Command-line options derived from a config dataclass, so each default, choice and help is written once.

Every field becomes one option: `--field-name` (or `metadata["flag"]`), its type from the annotation,
`Literal[...]` as choices, a field without default as a required option, `list[...]` as one or more
values, and a bool as a switch that flips its default (`--name` when the default is False, `--no-name`
when it is True). The help is `metadata["help"]` followed by the default the dataclass declares.
`config_from_args` builds the dataclass back from the parsed options.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _unwrap(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(value type, choices or None) of an annotation, with `X | None` read as X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _unwrap(args[0]) if len(args) == 1 else (str, None)
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def option_flag(f: dataclasses.Field) -> str:
    """The option string of one field: `metadata["flag"]`, else `--name` / `--no-name` for a True bool."""
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if _default(f) is True else f"--{name}"


def default_text(value: Any) -> str:
    """How a default reads in help text: lists comma-separated, everything else as `str`."""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one option per field of dataclass `cls` (fields named in `skip` left out)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no metadata['help'] for its command-line option")
        value_type, choices = _unwrap(hints[f.name])
        default = _default(f)
        helptext = f.metadata["help"].replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name}
        if value_type is bool:
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            if typing.get_origin(value_type) is list:
                kwargs["nargs"] = "+"
                value_type = typing.get_args(value_type)[0]
            kwargs["type"] = value_type
            if choices is not None:
                kwargs["choices"] = choices
            if "metavar" in f.metadata:
                kwargs["metavar"] = f.metadata["metavar"]
            if default is not None and default is not dataclasses.MISSING:
                helptext += f" (default: {default_text(default)})".replace("%", "%%")
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(option_flag(f), help=helptext, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """Build dataclass `cls` from parsed options (and `values` for fields that are no option)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    given = {name: getattr(args, name) for name in names if hasattr(args, name) and name not in values}
    return cls(**given, **values)
