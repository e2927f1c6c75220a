"""The fallback modes of inference: what a row whose char heads are unsure decodes with instead.

Two kinds of fallback (`SpeLLMForCausalLM.fallback`, one of `FALLBACK_KINDS`):

- `"approximate"`: the original lm_head on the student's final hidden state. Once the MLPs of the last N
  layers are retrained that state drifts, so this is not the teacher's prediction.
- `"exact"`: the teacher's own prediction. The student differs from the teacher only in the MLPs of its
  last N layers (layers L-N..L-1); their original weights are kept beside the trained ones
  (`original_mlps`, built by `build_original_mlps`; no copy of attention or norms: those modules are
  shared). The *original tail* (`spellm_ds.model.tail`) is layers L-N..L-1 run with the original MLPs,
  then the final norm and the lm_head; fed the input of layer L-N, which the student computes
  identically, it gives the teacher's distribution exactly. In `generate` a forward pre-hook on layer
  L-N (`record_layer_inputs`) records its input for every new position; the original tail has its own KV
  cache for those N layers only (`TailKV`: per layer `[B, g, T_max, e]` by sequence column, allocated at
  the first fallback). When a row falls back, the tail runs once over every position of that row it has
  not processed yet (from the row's last catch-up, or the whole prompt at the first one, up to the
  current position) and its last output is the fallback's hidden state (`ExactFallback`). Rows that fall
  back in the same step catch up in one batched pass from the smallest of their starts: for a row that
  had caught up further, the extra positions are recomputed from the same recorded inputs (identical
  K/V, overwritten). Recorded inputs are dropped once every row has processed them; a row that never
  falls back keeps them all (at most `B·T·d`). Between fallbacks nothing extra runs. With `sync_free`
  every row catches up every step (one position each), with no host read. The tail's attention gets an
  additive 4-D mask (causal, left padding, sliding window by column as transformers builds it), so it
  supports the `eager` and `sdpa` attention implementations. When N = 0 (heads only) the student's
  hidden state is the teacher's and both kinds coincide.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from spellm_ds.errors import SpellmError
from spellm_ds.model.tail import check_attention

FALLBACK_KINDS = ("exact", "approximate")


def build_original_mlps(model: Any, weights: Mapping[str, Tensor]) -> tuple[nn.ModuleList, int]:
    """The original MLPs of layers first..L-1 from the original values of the trained tensors, and first.

    `model` is a `spellm_ds.model.student.SpeLLMModel`; with no trained tensor there are no MLPs and
    first is L (the student's hidden state is the teacher's).
    """
    layout, layers = model.layout, model.layers
    prefix = f"{layout.layers}."
    per_layer: dict[int, dict[str, Tensor]] = {}
    bad = []
    for name, tensor in weights.items():
        index, _, inner = name[len(prefix) :].partition(".") if name.startswith(prefix) else ("", "", "")
        if not index.isdigit() or int(index) >= len(layers) or not inner.startswith(f"{layout.mlp}."):
            bad.append(name)
            continue
        per_layer.setdefault(int(index), {})[inner[len(layout.mlp) + 1 :]] = tensor
    if bad or "." in layout.mlp:
        raise SpellmError(
            f"the exact fallback replaces trained MLPs ({prefix}<i>.{layout.mlp}.*) only; "
            f"these trained tensors are not: {bad[:5]}"
        )
    if not per_layer:
        return nn.ModuleList(), len(layers)  # nothing trained below the heads
    check_attention(model.base.config, "the exact fallback (or use fallback='approximate')")
    first = min(per_layer)
    mlps = []
    for i in range(first, len(layers)):
        mlp = copy.deepcopy(getattr(layers[i], layout.mlp))
        params = dict(mlp.named_parameters())
        for pname, tensor in per_layer.get(i, {}).items():
            if pname not in params or tuple(params[pname].shape) != tuple(tensor.shape):
                have = tuple(params[pname].shape) if pname in params else "no such tensor"
                raise SpellmError(
                    f"original weight {prefix}{i}.{layout.mlp}.{pname} {tuple(tensor.shape)} does not "
                    f"fit the model ({have})"
                )
            with torch.no_grad():
                params[pname].copy_(tensor.to(params[pname].dtype))
        mlps.append(mlp.requires_grad_(False))
    return nn.ModuleList(mlps), first


@contextlib.contextmanager
def record_layer_inputs(target: nn.Module, sink: Callable[[Tensor], None]) -> Iterator[None]:
    """While inside, every input of the decoder layer `target` goes to `sink`."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module is target:  # not the original tail's twin of this layer, which shares its hooks
            sink(args[0] if args else kwargs["hidden_states"])

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class TailKV:
    """K/V of the original tail's layers for a batch, indexed by sequence column (allocated on first use)."""

    def __init__(self, batch: int, capacity: int) -> None:
        self.batch, self.capacity = batch, capacity
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}

    def view(self, rows: Tensor | None, start: int) -> TailKVView:
        """The cache object one catch-up hands to the tail's decoder layers (rows None: every row)."""
        return TailKVView(self, rows, start)


class TailKVView:
    """Duck-typed transformers cache: `update` writes new K/V at columns `start..` of `rows` and returns
    every column up to the last written one for those rows."""

    def __init__(self, kv: TailKV, rows: Tensor | None, start: int) -> None:
        self.kv, self.rows, self.start = kv, rows, start

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Store this call's K/V `[n, g, q, e]` and return the layer's K/V of columns `0..start+q-1`."""
        kv = self.kv
        if layer_idx not in kv.k:
            _, g, _, e = key_states.shape
            kv.k[layer_idx] = key_states.new_zeros(kv.batch, g, kv.capacity, e)
            kv.v[layer_idx] = value_states.new_zeros(kv.batch, g, kv.capacity, value_states.shape[-1])
        k, v = kv.k[layer_idx], kv.v[layer_idx]
        end = self.start + key_states.shape[2]
        if end > kv.capacity:
            raise RuntimeError(f"original-tail cache holds {kv.capacity} columns, asked for {end}")
        if self.rows is None:
            k[:, :, self.start : end] = key_states
            v[:, :, self.start : end] = value_states
            return k[:, :, :end], v[:, :, :end]
        k[self.rows, :, self.start : end] = key_states
        v[self.rows, :, self.start : end] = value_states
        return k[self.rows, :, :end], v[self.rows, :, :end]


class ExactFallback:
    """Per-row progress of the original tail during one `generate` call of `owner` (a SpeLLMForCausalLM).

    See the module doc for when rows catch up; `owner.original_tail` runs the layers."""

    def __init__(self, owner: Any, batch: int, capacity: int) -> None:
        self.owner = owner
        self.seen = [0] * batch  # columns the original tail has processed, per row
        self.chunks: list[tuple[int, Tensor]] = []  # (first column, layer L-N inputs [B, n, d])
        self.columns = 0
        self.kv = TailKV(batch, capacity)
        self.mask: Tensor | None = None  # Long[B, columns] the 2-D attention mask of the columns so far

    def record(self, hidden: Tensor) -> None:
        """Keep the layer L-N inputs `[B, n, d]` of the next n columns (called by the forward pre-hook)."""
        self.chunks.append((self.columns, hidden))
        self.columns += hidden.shape[1]

    def hidden(self, rows: list[int] | None) -> Tensor:
        """The original model's final normed hidden state `[n, d]` at the last column of `rows`."""
        mask = self.mask
        if mask is None or mask.shape[1] != self.columns:
            raise RuntimeError("exact fallback: the attention mask does not match the recorded columns")
        batch = len(self.seen)
        ids = range(batch) if rows is None else rows
        start = min(self.seen[r] for r in ids)
        idx = None if rows is None or len(rows) == batch else torch.tensor(rows, device=mask.device)
        pieces = [t[:, max(0, start - c0) :] for c0, t in self.chunks if c0 + t.shape[1] > start]
        x = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)
        if idx is not None:
            x, mask = x[idx], mask[idx]
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, start:]
        out = self.owner.original_tail(x, position, mask.bool(), start, self.kv.view(idx, start))
        for r in ids:
            self.seen[r] = self.columns
        low = min(self.seen)
        self.chunks = [(c0, t) for c0, t in self.chunks if c0 + t.shape[1] > low]
        return out[:, -1]
