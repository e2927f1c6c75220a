"""The measured recipe: the run-config fields every shipped recipe takes at their defaults.

Each field in `RECIPE_KEYS` was chosen by a measurement on the real teacher at the demo's budget
(`bench/fidelity.py`, results in docs/RESULTS.md under `fidelity`), and its run-config default is that
choice. `RECIPE_POLICY` holds those defaults; `recipe_deviations` names where a config differs from
them. A shipped recipe may deviate from one for its scale only with a comment on that line that starts
with `scale:` and gives the reason (tests/test_config.py checks this).
"""

from __future__ import annotations

from typing import Any

from spellm_ds.config.run import LossConfig, OptimConfig, TrainConfig, WarmStartConfig

RECIPE_KEYS = (
    "loss.selection",
    "loss.tau",
    "loss.regularizer",
    "loss.reg_weight",
    "warm_start.positions",
    "warm_start.iters",
    "warm_start.l2",
    "optim.lr",
    "optim.mlp_lr_scale",
)
_SECTIONS = {"loss": LossConfig, "warm_start": WarmStartConfig, "optim": OptimConfig}
RECIPE_POLICY: dict[str, Any] = {
    key: getattr(_SECTIONS[key.split(".")[0]](), key.split(".")[1]) for key in RECIPE_KEYS
}


def recipe_deviations(cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The policy keys where `cfg` differs from `RECIPE_POLICY`: key -> (value, policy value)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key, want in RECIPE_POLICY.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != want:
            out[key] = (value, want)
    return out
