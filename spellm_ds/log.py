"""Progress messages through `logging`: one `spellm_ds` logger tree, shown on rank 0 unless asked otherwise.

Library code logs with `get_logger("train")` (a child of `spellm_ds`) and never prints. Entry points
(the CLI, `python -m examples...`) call `setup_logging(rank)` once: INFO and above go to stderr as
`[spellm-ds train rank 0] message`, and a `RankFilter` drops records from ranks other than 0 unless the
record carries `extra=ALL_RANKS` (a message every rank must show: a per-worker summary, an error on one
rank). Applications that configure logging themselves may skip `setup_logging`; the records then go
wherever their handlers send the `spellm_ds` logger.
"""

from __future__ import annotations

import logging
import sys

ROOT = "spellm_ds"
ALL_RANKS = {"all_ranks": True}  # `extra=` for a record every rank shows


class RankFilter(logging.Filter):
    """Keeps records of rank 0, and records marked `all_ranks` on every rank; tags each with the rank."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        """Tag the record with this process's rank; keep it on rank 0 or when marked for all ranks."""
        record.rank = self.rank
        return self.rank == 0 or bool(getattr(record, "all_ranks", False))


class _Stderr(logging.StreamHandler):
    """A stream handler that writes to whatever `sys.stderr` is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        part = record.name.removeprefix(ROOT).lstrip(".") or "spellm-ds"
        prefix = f"[spellm-ds {part} rank {getattr(record, 'rank', 0)}]"
        if record.levelno >= logging.WARNING:
            prefix += f" {record.levelname.lower()}:"
        return f"{prefix} {record.getMessage()}"


def get_logger(component: str) -> logging.Logger:
    """The logger of one component (`train`, `build-shards`, ...), a child of `spellm_ds`."""
    return logging.getLogger(f"{ROOT}.{component}")


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Send `spellm_ds` records at `level` and above to stderr, rank 0 only (see module doc); idempotent."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if getattr(h, "_spellm_ds", False)]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler._spellm_ds = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter())
    handler.addFilter(RankFilter(rank))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
