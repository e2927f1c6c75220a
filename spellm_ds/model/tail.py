"""The original tail: layers L-N..L-1 of the student run with the original (untrained) MLPs.

The student differs from the teacher only in the MLPs of its last N decoder layers. Fed the input of
layer L-N, which both compute identically, the last N layers run with the original MLPs (attention and
norms are the student's own modules, shared) and then the final norm give the teacher's final normed
hidden state exactly. Two users: the exact fallback of inference (`spellm_ds.inference.model`, with a KV cache
and left padding) and the online teacher of training (`spellm_ds.model.teacher`, whole sequences, no cache).

A layer is run through a shallow twin (`with_module`) whose MLP child is the original one, so no module
of the model is ever modified. Under ZeRO-3 the twin shares the layer's DeepSpeed hooks, and the
original MLPs are registered submodules of the model, so every parameter the tail uses is gathered by
DeepSpeed's own hooks. The attention gets an additive 4-D mask built here (`tail_attention_mask`:
causal, padding, sliding window by column as transformers builds it), so the `eager` and `sdpa`
attention implementations are supported (`TAIL_ATTENTION`).

For inference the tail keeps its own KV cache (`TailKV`, per layer `[B, g, T_max, e]` by sequence
column) and `ExactFallback` tracks, per row of one `generate` call, which columns the tail has
processed and the recorded layer L-N inputs it still needs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from spellm_ds.errors import SpellmError
from spellm_ds.model.layouts import resolve_path

TAIL_ATTENTION = ("eager", "sdpa")  # attention implementations the original tail's 4-D mask supports


def tail_attention_mask(
    key_mask: Tensor, start: int, q_len: int, window: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Additive attention mask `[B, 1, q_len, T]` for queries at columns `start..start+q_len-1`.

    `key_mask` Bool[B, T] marks real (not padding) columns; a query sees real columns at or before its
    own, and with `window` only those after `column - window` (transformers' sliding-window rule). A
    query that sees nothing (a padding column) gets a finite uniform row, never NaN.
    """
    t = key_mask.shape[1]
    keys = torch.arange(t, device=key_mask.device)
    queries = torch.arange(start, start + q_len, device=key_mask.device)
    allowed = keys[None, :] <= queries[:, None]
    if window is not None:
        allowed = allowed & (keys[None, :] > queries[:, None] - window)
    allowed = allowed[None] & key_mask[:, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=key_mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=key_mask.device)
    return torch.where(allowed, zero, low)[:, None]


def with_module(layer: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """A shallow twin of `layer` whose child `name` is `module`; every other child is shared."""
    twin = copy.copy(layer)
    twin.__dict__["_modules"] = {**layer._modules, name: module}
    return twin


def sliding_window(layer: nn.Module, config: Any) -> int | None:
    """The sliding window of a decoder layer's attention (Qwen2: per layer; Mistral: the config's)."""
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, "sliding_window", None)


def cache_kwarg(body: nn.Module) -> str:
    """The name under which this transformers version's model body takes the KV cache."""
    import inspect

    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The KV cache a model body returned (its name differs across transformers versions)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def check_attention(config: Any, what: str = "the original tail") -> None:
    """Raise SpellmError unless the model's attention implementation takes the tail's 4-D mask."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in TAIL_ATTENTION:
        raise SpellmError(
            f"{what} runs with {' or '.join(TAIL_ATTENTION)} attention, this model uses {impl!r}: "
            "load it with attn_implementation='sdpa'"
        )


def run_original_tail(
    model: Any,
    mlps: Sequence[nn.Module],
    first: int,
    hidden: Tensor,
    position_ids: Tensor,
    key_mask: Tensor,
    start: int = 0,
    cache: Any = None,
) -> Tensor:
    """Final normed hidden states `[n, q, d]` of the original model from layer `first` inputs `[n, q, d]`.

    `model` is a `model.student.SpeLLMModel`; `mlps[i]` is the original MLP of layer `first + i`, up to
    the last layer. The inputs are columns `start..start+q-1`; `key_mask` Bool[n, start+q] marks real
    columns; `cache` (a KV cache object the layers accept) holds the K/V of the columns before `start`
    (None: `start` is 0 and nothing is cached).
    """
    layers = model.layers
    config = model.base.config
    check_attention(config)
    if first + len(mlps) != len(layers):
        raise SpellmError(
            f"{len(mlps)} original MLPs from layer {first} do not reach the last of {len(layers)}"
        )
    cache_kw = cache_kwarg(layers[first])
    position_embeddings = model.body.rotary_emb(hidden, position_ids)
    masks: dict[int | None, Tensor] = {}
    x = hidden
    for offset, mlp in enumerate(mlps):
        layer = with_module(layers[first + offset], model.layout.mlp, mlp)
        window = sliding_window(layer, config)
        if window not in masks:
            masks[window] = tail_attention_mask(key_mask, start, x.shape[1], window, x.dtype)
        kw = {} if cache is None else {cache_kw: cache, "use_cache": True}
        out = layer(
            x,
            attention_mask=masks[window],
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kw,
        )
        x = out[0] if isinstance(out, tuple) else out
    return resolve_path(model.base, model.layout.norm)(x)


# ---------------------------------------------------------------------------------------------------------
# Exact fallback: the original tail's KV cache and per-row catch-up state for one `generate` call


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

    See `spellm_ds.inference.model` for when rows catch up; `owner.original_tail` runs the layers."""

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
