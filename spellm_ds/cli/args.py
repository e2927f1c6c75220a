"""Command-line options derived from a config dataclass, so each default, choice and help is written once.

Every field becomes one option: `--field-name` (or `metadata["flag"]`), its type from the annotation,
`Literal[...]` as choices, a field without default as a required option, `list[...]` as one or more
values, and a bool as a switch that flips its default (`--name` when the default is False, `--no-name`
when it is True). The help is `metadata["help"]` followed by the default the dataclass declares.
`config_from_args` builds the dataclass back from the parsed options.

With `config_file=True` the command also takes `--config FILE`: a YAML mapping of the same fields
(field names, not flags), validated by `spellm_ds.config.schema.build` with the file named in every
problem; options given on the command line override the file, and a field without default must come
from one of the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from spellm_ds.config.schema import ConfigError, build
from spellm_ds.errors import SpellmError

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


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), config_file: bool = False
) -> None:
    """Add one option per field of dataclass `cls` (fields named in `skip` left out), and `--config`."""
    if config_file:
        parser.add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help="YAML mapping of these options by field name (e.g. seq_len: 2048); flags given override it",
        )
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
        if config_file:
            kwargs["default"] = argparse.SUPPRESS  # absent unless given, so the file's value stands
        elif default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(option_flag(f), help=helptext, **kwargs)


def _read_mapping(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpellmError(f"--config {path}: cannot read ({exc})") from exc
    except yaml.YAMLError as exc:
        raise SpellmError(f"--config {path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpellmError(f"--config {path}: expected a mapping of option names, got {type(data).__name__}")
    return data


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """Build dataclass `cls` from parsed options, over a `--config` file when one was given."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    given = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name) and f.name not in values}
    source = getattr(args, "config", None)
    data = _read_mapping(source) if source else {}
    data.update(given)
    data.update(values)
    missing = [f for f in fields if f.name not in data and _default(f) is dataclasses.MISSING]
    if missing:
        names = ", ".join(option_flag(f) for f in missing)
        where = f" (or their field names in {source})" if source else " (or a --config file naming them)"
        raise SpellmError(f"the options {names} are required{where}")
    problems: list[str] = []
    obj, ok = build(cls, data, "", problems)
    if not ok:
        raise ConfigError(f"options{f' and {source}' if source else ''}", problems)
    return obj


def add_export_options(
    parser: argparse.ArgumentParser, *, base_model: bool = True, remote_code: bool = False
) -> None:
    """The options of a command that loads an export: `--model`, `--base-model`, `--trust-remote-code`."""
    parser.add_argument("--model", required=True, metavar="DIR", help="export directory")
    if base_model:
        parser.add_argument("--base-model", default=None, metavar="DIR", help="base model of a delta export")
    if remote_code:
        parser.add_argument(
            "--trust-remote-code", action="store_true", help="allow the model's own code to run"
        )


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """`--device`: where a command runs the model."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
