"""Subcommands that run or plan a distillation: train, plan."""

from __future__ import annotations

import argparse

from spellm_ds.cli.args import add_config_arguments, config_from_args
from spellm_ds.plan.estimate import PlanInputs


# --- train ---
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="distil: ZeRO-3 training of the char heads and the last N MLPs (any launcher)",
        description="Train from a run config (configs/*.yaml). Launch under torchrun, the deepspeed "
        "launcher, mpirun or srun, or alone for one process. Exit codes: 0 done, 2 bad input, "
        "3 too many non-finite losses in a row, 75 interrupted by SIGUSR1/SIGTERM after saving a "
        "checkpoint (run the same command again to resume).",
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-4 max_steps=10"
    )
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from spellm_ds.config.run import load_config
    from spellm_ds.train.loop import train

    return train(load_config(args.config, args.overrides))


# --- plan ---
def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory and all-gather traffic of a ZeRO-3 distillation run, from a config.json",
        description="Estimate parameters, per-GPU memory, all-gather bytes and the largest micro-batch "
        "that fits, from an HF config.json alone (formulas: spellm_ds/plan/estimate.py).",
    )
    p.add_argument("--model-config", required=True, help="HF config.json (or a model directory)")
    add_config_arguments(p, PlanInputs)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    import json

    from spellm_ds.plan.estimate import make_plan
    from spellm_ds.plan.report import format_plan
    from spellm_ds.plan.shapes import load_model_shape

    plan = make_plan(load_model_shape(args.model_config), config_from_args(PlanInputs, args))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub`."""
    _add_train(sub)
    _add_plan(sub)
