"""`python -m spellm_ds.cli`: the same command line as `spellm-ds`."""

from spellm_ds.cli import run

run()
