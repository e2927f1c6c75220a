"""Offline lm-eval runs on local task YAMLs (`spellm-ds lm-eval-local`), the `spellm` model's counters kept.

`evaluate_local` runs lm-eval's `simple_evaluate` with the Hub and datasets offline on a copy of a local
task directory (`spellm_ds.eval.tasks.local_task_dir`), for the `spellm` model (`spellm_ds.eval.harness`)
or any model lm-eval knows; for `spellm` the result also holds its fallback, threshold, counters and rates.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from spellm_ds.dist import default_device
from spellm_ds.errors import SpellmError
from spellm_ds.eval.harness import SpeLLMEvalLM
from spellm_ds.eval.tasks import local_task_dir
from spellm_ds.jsonio import write_text


def evaluate_local(
    model_dir: str | os.PathLike,
    tasks_dir: str | os.PathLike,
    tasks: list[str],
    *,
    model_args: str | dict[str, Any] | None = None,
    model: str = "spellm",
    output: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    log_samples: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on local task YAMLs, offline; the result also holds the counters."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, simple_parse_args_string

    if not tasks:
        raise SpellmError("no task given")
    args = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})
    args["pretrained"] = str(model_dir)
    device = default_device(device)
    with tempfile.TemporaryDirectory(prefix="lm_eval_tasks_") as tmp:
        include = local_task_dir(tasks_dir, tmp)
        tm_kwargs: dict[str, Any] = {"include_path": str(include)}
        if "include_defaults" in inspect.signature(TaskManager.__init__).parameters:
            tm_kwargs["include_defaults"] = False  # no scan of lm-eval's own task tree
        manager = TaskManager(**tm_kwargs)
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise SpellmError(f"{tasks_dir} defines no task {', '.join(missing)}")
        lm = get_model(model).create_from_arg_obj(args, {"batch_size": batch_size, "device": device})
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:  # a rank other than 0
        return {}
    if isinstance(lm, SpeLLMEvalLM):
        results["spellm"] = {
            "fallback": lm.fallback,
            "threshold": lm.threshold,
            "counters": copy.deepcopy(lm.counters),
            "rates": lm.rates(),
        }
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        # lm-eval's results hold numpy scalars and other objects its own serialiser turns into JSON
        write_text(out, json.dumps(results, indent=1, default=handle_non_serializable) + "\n")
    return results
