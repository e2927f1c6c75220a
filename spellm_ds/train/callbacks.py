"""Training callbacks: the seam the loop calls at fixed points, and the loading of the run config's list.

A `Callback` overrides any of the methods below; the base class does nothing at each. The trainer calls
the run's callbacks on every rank, in the order the run config lists them, at these points:

    on_samples(step, batches, sample_index)      a training micro-batch was drawn: the optimizer step it
                                                 belongs to (1-based), the micro-batches this rank has
                                                 drawn so far (1-based, skipped ones included) and its
                                                 sample indices (-1 marks padding)
    on_teacher_topk(sample_index, ids, logprobs) teacher: online: the teacher's top-k of that training
                                                 micro-batch, computed inside the forward
    on_loss(batches, loss) -> loss               its loss was computed, before the all-rank finite check;
                                                 the returned tensor is the loss the step goes on with
    on_step(step)                                optimizer step `step` is done, with its logging, eval
                                                 and checkpoint where they were due
    close()                                      the run ends (any way)

The run config's `callbacks` lists `module:factory` import paths; `load_callbacks` imports each module
and calls its factory once per rank at start, before any process group, as `factory(rank)`; it returns
a Callback. A path that does not import or a factory that returns something else is bad input (exit 2).
A normal run lists none; the tests inject faults and trace samples this way (`tests/fault_injection.py`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

from spellm_ds.errors import SpellmError


class Callback:
    """Called by the training loop at fixed points (see the module docstring); every method is a no-op."""

    def on_samples(self, step: int, batches: int, sample_index: torch.Tensor) -> None:
        """A training micro-batch of optimizer step `step` was drawn (the `batches`-th of this rank)."""

    def on_teacher_topk(
        self, sample_index: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
    ) -> None:
        """teacher: online: the teacher's top-k of a training micro-batch are known."""

    def on_loss(self, batches: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of this rank's `batches`-th micro-batch; return the loss the step uses."""
        return loss

    def on_step(self, step: int) -> None:
        """Optimizer step `step` is done (logged, evaluated and saved where due)."""

    def close(self) -> None:
        """The run ends: release what the callback holds."""


class CallbackList(Callback):
    """Several callbacks called as one, in order; `on_loss` passes each one's result to the next."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_samples(self, step: int, batches: int, sample_index: torch.Tensor) -> None:
        for cb in self.callbacks:
            cb.on_samples(step, batches, sample_index)

    def on_teacher_topk(
        self, sample_index: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
    ) -> None:
        for cb in self.callbacks:
            cb.on_teacher_topk(sample_index, topk_ids, topk_logprobs)

    def on_loss(self, batches: int, loss: torch.Tensor) -> torch.Tensor:
        for cb in self.callbacks:
            loss = cb.on_loss(batches, loss)
        return loss

    def on_step(self, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step(step)

    def close(self) -> None:
        for cb in self.callbacks:
            cb.close()


def load_callbacks(paths: Sequence[str], rank: int) -> CallbackList:
    """The callbacks that `module:factory` paths name, each factory called once with `rank`."""
    loaded: list[Callback] = []
    for i, path in enumerate(paths):
        where = f"callbacks[{i}]={path!r}"
        module_name, _, factory_name = path.partition(":")
        try:
            module = importlib.import_module(module_name.strip())
        except ImportError as exc:
            raise SpellmError(
                f"{where}: cannot import {module_name.strip()!r} ({exc}); the module must be on every "
                "rank's PYTHONPATH"
            ) from None
        factory = getattr(module, factory_name.strip(), None)
        if not callable(factory):
            raise SpellmError(f"{where}: {module_name.strip()} has no callable {factory_name.strip()!r}")
        callback = factory(rank)
        if not isinstance(callback, Callback):
            raise SpellmError(
                f"{where}: the factory returned {type(callback).__name__}, not a "
                "spellm_ds.train.callbacks.Callback"
            )
        loaded.append(callback)
    return CallbackList(loaded)
