"""Options derived from config dataclasses (spellm_ds/cli/args.py): the help of `build-shards` and `plan`
shows each dataclass default, and parsing gives back the dataclass those defaults make."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from spellm_ds.cli.args import add_config_arguments, config_from_args
from spellm_ds.config.schema import Section
from spellm_ds.data.build import BuildConfig
from spellm_ds.errors import SpellmError
from spellm_ds.plan.estimate import PlanInputs


@dataclass(kw_only=True)
class _Toy(Section):
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


def _file_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_config_arguments(p, _Toy, config_file=True)
    return p


def test_a_config_file_gives_values_and_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: from-file\ninputs: [a, b]\nmode: b\nrate: 0.25\nprogress: false\n")
    args = _file_parser().parse_args(["--config", str(recipe), "--rate", "0.75"])
    got = config_from_args(_Toy, args)
    assert got == _Toy(name="from-file", inputs=["a", "b"], mode="b", rate=0.75, progress=False)
    args = _file_parser().parse_args(["--config", str(recipe), "--name", "flag", "--input", "c"])
    assert config_from_args(_Toy, args).name == "flag"
    assert config_from_args(_Toy, args).inputs == ["c"]


def test_config_file_problems_name_the_file_and_the_key(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\ninputs: [a]\nrat: 0.25\nmode: c\nlimit: many\n")
    with pytest.raises(SpellmError) as err:
        config_from_args(_Toy, _file_parser().parse_args(["--config", str(recipe)]))
    text = str(err.value)
    assert str(recipe) in text
    assert "unknown key 'rat' (did you mean 'rate'?)" in text
    assert "mode='c' is not one of a, b" in text
    assert "limit='many' is not an integer" in text
    recipe.write_text("mode: b\n")
    with pytest.raises(SpellmError, match=r"the options --name, --input are required \(or their field names"):
        config_from_args(_Toy, _file_parser().parse_args(["--config", str(recipe)]))
    recipe.write_text("- a list\n")
    with pytest.raises(SpellmError, match="expected a mapping of option names, got list"):
        config_from_args(_Toy, _file_parser().parse_args(["--config", str(recipe)]))
    with pytest.raises(SpellmError, match="cannot read"):
        config_from_args(_Toy, _file_parser().parse_args(["--config", str(tmp_path / "absent.yaml")]))


RECIPES = sorted((Path(__file__).resolve().parents[1] / "data_prep" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_data_prep_recipes_are_valid_build_configs(recipe):
    from spellm_ds.cli import build_parser

    cfg = config_from_args(BuildConfig, build_parser().parse_args(["build-shards", "--config", str(recipe)]))
    written = yaml.safe_load(recipe.read_text())
    assert {name: getattr(cfg, name) for name in written} == written
    override = build_parser().parse_args(["build-shards", "--config", str(recipe), "--max-samples", "8"])
    assert config_from_args(BuildConfig, override).max_samples == 8


def test_there_are_recipes():
    assert len(RECIPES) >= 3


def test_dtype_choices_are_the_one_vocabulary():
    from spellm_ds.data.build import DTYPES
    from spellm_ds.dtypes import TORCH_DTYPES

    assert DTYPES == ("auto", "float32", "bfloat16", "float16")
    assert DTYPES[1:] == tuple(TORCH_DTYPES)
