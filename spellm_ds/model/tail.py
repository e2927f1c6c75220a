"""The original tail: layers L-N..L-1 of the student run with the original (untrained) MLPs.

The student differs from the teacher only in the MLPs of its last N decoder layers. Fed the input of
layer L-N, which both compute identically, the last N layers run with the original MLPs (attention and
norms are the student's own modules, shared) and then the final norm give the teacher's final normed
hidden state exactly. Two users: the exact fallback of inference (`spellm_ds.inference.fallback`, with a KV
cache and left padding) and the online teacher of training (`spellm_ds.model.teacher`, whole sequences, no
cache).

A layer is run through a shallow twin (`with_module`) whose MLP child is the original one, so no module
of the model is ever modified. Under ZeRO-3 the twin shares the layer's DeepSpeed hooks, and the
original MLPs are registered submodules of the model, so every parameter the tail uses is gathered by
DeepSpeed's own hooks. The attention gets an additive 4-D mask built here (`tail_attention_mask`:
causal, padding, sliding window by column as transformers builds it), so the `eager` and `sdpa`
attention implementations are supported (`TAIL_ATTENTION`).

The tail's own KV cache for inference, and the per-row catch-up of one `generate` call, are
`spellm_ds.inference.fallback`'s (`TailKV`, `ExactFallback`); here `run_original_tail` takes any cache
object the decoder layers accept.
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
