"""The loader's resumable state: its format, the check of a saved state, and the merge of ranks' states.

A state (`spellm_ds.data.loader.ShardLoader.state_dict`, JSON-safe) holds one rank's consumption; before
saving, the states of all ranks are merged (`merge_states`: OR of the consumed bitmaps, cursors and
corrupt counts combined), and `ShardLoader.load_state_dict` accepts the merged state at any world size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from spellm_ds.data.epoch_plan import pack_bitmap, unpack_bitmap
from spellm_ds.errors import SpellmError

STATE_FORMAT = "spellm-ds-loader-state"
STATE_VERSION = 2  # 2: plans split shards between ranks and slots; 1 (whole shards) is re-planned


def check_state(state: dict[str, Any]) -> None:
    """Refuse anything but a loader state of a version this loader reads."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SpellmError(
            f"not a loader state (format {state.get('format') if isinstance(state, dict) else None!r})"
        )
    if state.get("version") not in (1, STATE_VERSION):
        raise SpellmError(f"loader state version {state.get('version')} is not 1 or {STATE_VERSION}")


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the states of several ranks: OR of consumed bitmaps, cursors and corrupt counts combined."""
    if not states:
        raise SpellmError("merge_states needs at least one state")
    for s in states:
        check_state(s)
    first = states[0]
    for field in ("version", "dataset", "seed", "epoch", "plan", "corrupt_base"):
        values = {json.dumps(s[field], sort_keys=True) for s in states}
        if len(values) != 1:
            raise SpellmError(f"loader states disagree on {field!r}; they come from different runs or epochs")
    count = first["dataset"]["samples"]
    consumed = np.zeros(count, dtype=bool)
    cursors: list[int | None] = [None] * first["plan"]["world_size"]
    ranks: set[int] = set()
    for s in states:
        consumed |= unpack_bitmap(s["consumed"], count)
        for r in s["ranks"]:
            cursors[r] = s["cursor"][r]
        ranks.update(s["ranks"])
    base = int(first["corrupt_base"])
    total = base + sum(int(s["corrupt_skipped"]) - base for s in states)
    merged = dict(first)
    merged.update(
        consumed=pack_bitmap(consumed),
        cursor=cursors,
        ranks=sorted(ranks),
        corrupt_skipped=total,
        corrupt_base=total,
    )
    return merged
