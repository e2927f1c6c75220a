"""Local lm-eval task directories: a copy of the task YAMLs that runs from any working directory.

`local_task_dir` copies a task directory with the relative data paths of each YAML made absolute (read from
the YAML's own directory). The YAMLs are read and written with their custom tags (`!function utils.f`)
kept as written, so lm-eval resolves them in the copy as in the original.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from spellm_ds.errors import SpellmError


class _Tagged:
    """A YAML value under a custom tag (`!function utils.f`), kept as written."""

    def __init__(self, tag: str, value: str) -> None:
        self.tag, self.value = tag, value


class _KeepTagsLoader(yaml.SafeLoader):
    pass


class _KeepTagsDumper(yaml.SafeDumper):
    pass


_KeepTagsLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: _Tagged("!" + suffix, loader.construct_scalar(node))
)
_KeepTagsDumper.add_representer(_Tagged, lambda dumper, t: dumper.represent_scalar(t.tag, t.value))


def _absolute(value: Any, base: Path) -> Any:
    """A `data_files`-style value (str, list, dict) with relative paths found under `base` made absolute."""
    if isinstance(value, str):
        if "://" in value or Path(value).is_absolute():
            return value
        target = base / value
        return str(target.resolve()) if target.exists() or any(base.glob(value)) else value
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def local_task_dir(tasks_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a task directory to `out_dir` with every relative data path made absolute (from the YAML's dir).

    In each YAML, `dataset_kwargs.data_files` / `data_dir` and a `dataset_path` that names an existing
    local file or directory are read relative to the YAML's own directory, so the copy runs from any
    working directory; every other file is copied as it is."""
    src, dst = Path(tasks_dir), Path(out_dir)
    if not src.is_dir():
        raise SpellmError(f"task directory {src} does not exist")
    found = False
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix not in (".yaml", ".yml"):
            target.write_bytes(path.read_bytes())
            continue
        found = True
        try:
            cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_KeepTagsLoader)
        except yaml.YAMLError as exc:
            raise SpellmError(f"{path}: not valid YAML ({exc})") from None
        if isinstance(cfg, dict):
            base = path.parent.resolve()
            kwargs = cfg.get("dataset_kwargs")
            if isinstance(kwargs, dict):
                for key in ("data_files", "data_dir"):
                    if key in kwargs:
                        kwargs[key] = _absolute(kwargs[key], base)
            dpath = cfg.get("dataset_path")
            if isinstance(dpath, str) and (base / dpath).exists() and not Path(dpath).is_absolute():
                cfg["dataset_path"] = str((base / dpath).resolve())
        target.write_text(
            yaml.dump(cfg, Dumper=_KeepTagsDumper, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
    if not found:
        raise SpellmError(f"task directory {src} holds no task YAML")
    return dst
