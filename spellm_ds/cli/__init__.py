"""`spellm-ds <subcommand>`: argument parsing only; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from spellm_ds.cli import data, evaluation, serving, training
from spellm_ds.dist import detect
from spellm_ds.errors import SpellmError
from spellm_ds.log import setup_logging

# Each subcommand owns one section of a module of this package: `_add_<name>(subparsers)` registers its
# parser and sets `func` to a `_run_<name>(args) -> int` that imports its library module lazily (fast
# `--help`); each module's `register` adds its subcommands, in the order the help lists them.
COMMAND_MODULES = (data, training, serving, evaluation)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="spellm-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<subcommand>")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit with code 2."""
    args = build_parser().parse_args(argv)
    try:
        setup_logging(detect().rank)
        return int(args.func(args) or 0)
    except SpellmError as exc:
        print(f"spellm-ds {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """Console entry point: `main`, leave any process group a command joined, exit with its code."""
    from spellm_ds.dist import exit_process, leave_process_group

    code = main()
    # train has left its group after waiting for every rank; a multi-rank export's ranks passed its last
    # barrier, so nothing is waited for here (one rank's error must not hold the others)
    leave_process_group(clean=False)
    exit_process(code)
