"""Options derived from config dataclasses (spellm_ds/cli/args.py): the help of `build-shards` and `plan`
shows each dataclass default, and parsing gives back the dataclass those defaults make."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from spellm_ds.cli.args import add_config_arguments, config_from_args
from spellm_ds.data.build import BuildConfig
from spellm_ds.plan.estimate import PlanInputs


@dataclass(kw_only=True)
class _Toy:
    name: str = field(metadata={"help": "a name"})
    inputs: list[str] = field(metadata={"help": "files", "flag": "--input", "metavar": "FILE"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "which mode"})
    rate: float = field(default=0.5, metadata={"help": "share in %"})
    limit: int | None = field(default=None, metadata={"help": "stop early"})
    progress: bool = field(default=True, metadata={"help": "show progress"})
    dry_run: bool = field(default=False, metadata={"help": "do nothing"})


def _parser(cls: type) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_config_arguments(p, cls)
    return p


def test_fields_become_options_with_their_types_and_defaults():
    p = _parser(_Toy)
    args = p.parse_args(["--name", "x", "--input", "f1", "f2"])
    assert config_from_args(_Toy, args) == _Toy(name="x", inputs=["f1", "f2"])
    args = p.parse_args(
        [
            "--name",
            "x",
            "--input",
            "f",
            "--mode",
            "b",
            "--rate",
            "2",
            "--limit",
            "7",
            "--no-progress",
            "--dry-run",
        ]
    )
    got = config_from_args(_Toy, args)
    assert got == _Toy(name="x", inputs=["f"], mode="b", rate=2.0, limit=7, progress=False, dry_run=True)
    assert isinstance(got.rate, float) and isinstance(got.limit, int)


def test_choices_and_required_options_are_enforced(capsys):
    p = _parser(_Toy)
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "x", "--input", "f", "--mode", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "x"])
    assert "--input" in capsys.readouterr().err


def test_help_states_each_default_once():
    text = " ".join(_parser(_Toy).format_help().split())
    assert "which mode (default: a)" in text
    assert "share in % (default: 0.5)" in text
    assert "stop early" in text and "stop early (default" not in text
    assert "--no-progress show progress" in text
    assert "--dry-run do nothing" in text


def test_a_field_without_help_is_refused():
    @dataclass
    class Bare:
        x: int = 1

    with pytest.raises(TypeError, match=r"Bare\.x has no metadata\['help'\]"):
        _parser(Bare)


def _option_help(help_text: str) -> dict[str, str]:
    """Option string -> its help paragraph, whitespace collapsed."""
    blocks = re.split(r"\n  (?=-)", help_text)
    out = {}
    for block in blocks[1:]:
        flat = " ".join(block.split())
        out[flat.split()[0].rstrip(",")] = flat
    return out


@pytest.mark.parametrize(
    ("command", "cls", "required", "expected"),
    [
        (
            ["plan"],
            PlanInputs,
            ["--model-config", "cfg", "--nodes", "2", "--gpus-per-node", "8"],
            PlanInputs(nodes=2, gpus_per_node=8),
        ),
        (
            ["build-shards"],
            BuildConfig,
            ["--teacher", "t", "--input", "a.txt", "--output", "o"],
            BuildConfig(teacher="t", inputs=["a.txt"], output="o"),
        ),
    ],
)
def test_subcommand_help_shows_the_dataclass_defaults(command, cls, required, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "spellm_ds.cli", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    options = _option_help(proc.stdout)
    for f in dataclasses.fields(cls):
        name = f.name.replace("_", "-")
        flag = f.metadata.get("flag") or (f"--no-{name}" if f.default is True else f"--{name}")
        assert flag in options, f"{cls.__name__}.{f.name}: no {flag} in `{' '.join(command)} --help`"
        helptext = options[flag]
        assert " ".join(f.metadata["help"].split()) in helptext
        if f.default is dataclasses.MISSING or f.default is None or isinstance(f.default, bool):
            assert "(default:" not in helptext, helptext
        else:
            assert f"(default: {f.default})" in helptext, helptext
    from spellm_ds.cli import build_parser

    assert config_from_args(cls, build_parser().parse_args([*command, *required])) == expected
