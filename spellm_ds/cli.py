"""`spellm-ds <subcommand>`: argument parsing only; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import sys

from spellm_ds.errors import SpellmError

# Each subcommand owns one section below: `_add_<name>(subparsers)` registers its parser and sets
# `func` to a `_run_<name>(args) -> int` that imports its library module lazily (fast `--help`).


# --- charset ---


# --- build-shards ---


# --- shards ---


# --- train ---


# --- export ---


# --- generate ---


# --- eval ---


# --- plan ---


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="spellm-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<subcommand>")
    for name, obj in sorted(globals().items()):
        if name.startswith("_add_") and callable(obj):
            obj(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpellmError as exc:
        print(f"spellm-ds {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
