"""Fault injection and tracing for the trainer tests: a training callback driven by environment variables.

The tests' run configs register it as `callbacks: [fault_injection:from_env]` (tests/train_helpers.py
writes it into every config, tests/slurm_jobs.py passes it as an override), and the environments they
build for the ranks put tests/ on PYTHONPATH. Each rank reads the variables once at start; unset ones
do nothing, so a run without them trains normally:

    SPELLM_TEST_NAN_BATCHES=3,4     micro-batches (1-based count of batches drawn) whose loss is NaN
    SPELLM_TEST_KILL_AT_STEP=5      every rank SIGKILLs itself right after optimizer step 5
    SPELLM_TEST_STEP_SLEEP=0.2      sleep this many seconds after every optimizer step
    SPELLM_TRACE_SAMPLES=DIR        each rank appends "step<TAB>sample indices" per micro-batch to
                                    DIR/rank<R>.tsv (the exactly-once accounting the tests check)
    SPELLM_TRACE_TEACHER=DIR        teacher: online only: each rank saves the sample indices and the
                                    online teacher's top-k of every training micro-batch to
                                    DIR/rank<R>_<count>.npz (compared with teacher shards by the tests)

Not a test file.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from spellm_ds.train.callbacks import Callback


class FaultInjection(Callback):
    """NaN losses, a SIGKILL after one step, a sleep after every step, sample and teacher traces."""

    def __init__(
        self,
        rank: int,
        *,
        nan_batches: set[int],
        kill_at_step: int,
        step_sleep: float,
        trace_dir: Path | None,
        teacher_dir: Path | None,
    ) -> None:
        self.rank = rank
        self.nan_batches = nan_batches
        self.kill_at_step = kill_at_step
        self.step_sleep = step_sleep
        self.trace_dir = trace_dir
        self.teacher_dir = teacher_dir
        self.teacher_count = 0
        self.trace: TextIO | None = None

    def on_samples(self, step: int, batches: int, sample_index: torch.Tensor) -> None:
        if self.trace_dir is None:
            return
        if self.trace is None:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            self.trace = (self.trace_dir / f"rank{self.rank}.tsv").open("a", encoding="utf-8")
        idx = ",".join(str(int(i)) for i in sample_index.tolist())
        self.trace.write(f"{step}\t{idx}\n")
        self.trace.flush()

    def on_teacher_topk(
        self, sample_index: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
    ) -> None:
        if self.teacher_dir is None:
            return
        self.teacher_dir.mkdir(parents=True, exist_ok=True)
        self.teacher_count += 1
        np.savez(
            self.teacher_dir / f"rank{self.rank}_{self.teacher_count:06d}.npz",
            sample_index=sample_index.cpu().numpy(),
            topk_ids=topk_ids.cpu().numpy(),
            topk_logprobs=topk_logprobs.cpu().numpy(),
        )

    def on_loss(self, batches: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if batches in self.nan_batches else loss

    def on_step(self, step: int) -> None:
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.kill_at_step and step == self.kill_at_step:
            if self.trace is not None:
                self.trace.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
            self.trace = None


def from_env(rank: int) -> FaultInjection:
    """The callback the SPELLM_TEST_* / SPELLM_TRACE_* variables of this process describe."""
    env = os.environ
    trace, teacher = env.get("SPELLM_TRACE_SAMPLES"), env.get("SPELLM_TRACE_TEACHER")
    return FaultInjection(
        rank,
        nan_batches={int(x) for x in env.get("SPELLM_TEST_NAN_BATCHES", "").split(",") if x.strip()},
        kill_at_step=int(env.get("SPELLM_TEST_KILL_AT_STEP", "0") or 0),
        step_sleep=float(env.get("SPELLM_TEST_STEP_SLEEP", "0") or 0),
        trace_dir=Path(trace) if trace else None,
        teacher_dir=Path(teacher) if teacher else None,
    )
