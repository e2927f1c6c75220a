"""Inference for an exported SpeLLM model: the char-head decode step, AutoCorrect, entropy fallback, generate.

Decode step (`SpeLLMForCausalLM.decode_step`, every row of a batch at once, no loop over tokens):

1. One matmul of the final normed hidden state `[N, d]` with the stacked head weight `[k·|C|, d]`, viewed
   as logits `[N, k, |C|]` (row `i·|C| + c` of the weight is head i, symbol c).
2. Per-head argmax (or per-head sampling, below) gives a char string `[N, k]`; a string ends at its first
   `<end>`: anything a later head predicts is ignored.
3. `TokenLookup.lookup` (spellm_ds.charset) maps the string to its canonical token id on the device, -1
   where the string is no token.
4. AutoCorrect for those rows: the decodable token with the highest sum of per-head log-probs of its own
   END-padded row, `argmax_v Σ_i log p_i(chars[v, i])`. That is k `index_select`s of a `[N, |C|]` row
   over the `[k, V']` table of decodable tokens, summed: `O(N·k·V')` adds, no `[V, d]` matmul (a
   decodable token is one whose own row looks up to it, so the result always round-trips).
5. Entropy fallback: `H = mean_i entropy(softmax(logits_i))`; rows with `H > threshold` take the original
   model's prediction instead (below). `threshold=None` never falls back on entropy; a negative threshold
   falls back on every row (the base model's own decode).

Two kinds of fallback (`SpeLLMForCausalLM.fallback`):

- `"approximate"`: the original lm_head on the student's final hidden state. Once the MLPs of the last N
  layers are retrained that state drifts, so this is not the teacher's prediction.
- `"exact"`: the teacher's own prediction. The student differs from the teacher only in the MLPs of its
  last N layers (layers L-N..L-1); their original weights are kept beside the trained ones
  (`original_mlps`, no copy of attention or norms: those modules are shared). The *original tail* is
  layers L-N..L-1 run with the original MLPs, then the final norm and the lm_head; fed the input of layer
  L-N, which the student computes identically, it gives the teacher's distribution exactly. In
  `generate` a forward pre-hook on layer L-N records its input for every new position; the original tail
  has its own KV cache for those N layers only (`TailKV`: per layer `[B, g, T_max, e]` by sequence
  column, allocated at the first fallback). When a row falls back, the tail runs once over every position
  of that row it has not processed yet (from the row's last catch-up, or the whole prompt at the first
  one, up to the current position) and its last output is the fallback's hidden state. Rows that fall
  back in the same step catch up in one batched pass from the smallest of their starts: for a row that
  had caught up further, the extra positions are recomputed from the same recorded inputs (identical
  K/V, overwritten). Recorded inputs are dropped once every row has processed them; a row that never
  falls back keeps them all (at most `B·T·d`). Between fallbacks nothing extra runs. With `sync_free`
  every row catches up every step (one position each), with no host read. The tail's attention gets an
  additive 4-D mask built here (causal, left padding, sliding window by column as transformers builds
  it), so it supports the `eager` and `sdpa` attention implementations. When N = 0 (heads only) the
  student's hidden state is the teacher's and both kinds coincide.

Host syncs. Counters (exact hits, AutoCorrect, fallback) are device tensors read once per `generate`
call. By default a step reads back one pair of integers, how many rows need AutoCorrect and how many need
the fallback; only those rows are gathered and run through the `O(V')` AutoCorrect scoring and the
full-vocabulary lm_head, so a step whose strings all hit and whose heads are all confident never touches
a `V`-sized tensor. That one read is what lets the lm_head be skipped (the source of the speedup).
`sync_free=True` removes it: AutoCorrect and the lm_head run on every row of every step and `torch.where`
picks per row (for CUDA graphs or `torch.compile`, or when fallback is frequent anyway). `generate` reads
one "all rows ended" boolean every `eos_check_every` steps.

Sampling (`temperature > 0`): the char path samples each head's symbol from its own softmax at that
temperature, restricted to the head's top-p nucleus; a sampled string that is no token is AutoCorrected
by sampling a token from the AutoCorrect scores (sum of tempered per-head log-probs) under the same
top-p; fallback rows sample from the lm_head softmax at that temperature and top-p. The entropy that
decides the fallback always comes from the untempered heads, as calibrated.

Loading: `SpeLLMForCausalLM.from_pretrained(DIR)` reads an export directory (spellm_ds.export.write writes
it); a delta export is applied on top of the base model its `spellm_config.json` records (or the one
given). The original weights of the trained tensors come from `original_mlps.safetensors` of a full
export, or from the base model itself before a delta is applied; `fallback=None` chooses `"exact"`
where they are present and `"approximate"` otherwise, `fallback="approximate"` never loads them. The
threshold is the one calibrated for that kind (`fallback_thresholds` in `spellm_config.json`) when
recorded, else `fallback_threshold`. Every file is checked before the model is built, so a bad
directory raises `SpellmError` and nothing is half-loaded. Torch files are never unpickled; remote
code runs only with `trust_remote_code=True`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spellm_ds.errors import SpellmError
from spellm_ds.export.format import (
    CHAR_HEADS_FILE,
    CHARSET_FILE,
    DELTA_FILE,
    ORIGINAL_MLPS_FILE,
    PAPER_THRESHOLD,
    open_export,
)
from spellm_ds.model.tail import (
    ExactFallback,
    cache_kwarg,
    check_attention,
    returned_cache,
    run_original_tail,
)

EXACT, AUTOCORRECT, FALLBACK = 0, 1, 2
PATH_NAMES = ("exact", "autocorrect", "fallback")
FALLBACK_KINDS = ("exact", "approximate")


# ---------------------------------------------------------------------------------------------------------
# Pure tensor functions of the decode step


def canonical_chars(chars: Tensor, end_id: int = 0) -> Tensor:
    """Set every symbol after the first `<end>` to `<end>` (a string ends at its first end symbol)."""
    after = (chars == end_id).long().cumsum(-1) > 0
    return chars.masked_fill(after, end_id)


def head_log_probs(hidden: Tensor, head_weight: Tensor, k: int) -> Tensor:
    """Per-head log-probs `[..., k, |C|]` (float32) of the char heads on hidden states `[..., d]`."""
    logits = F.linear(hidden.to(head_weight.dtype), head_weight).float()
    return logits.view(*hidden.shape[:-1], k, -1).log_softmax(-1)


def mean_head_entropy(logp: Tensor) -> Tensor:
    """Mean over the k heads of each head's entropy in nats: `[..., k, |C|]` log-probs → `[...]`."""
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(-1).mean(-1)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Mask (to -inf) the logits outside the smallest set whose probability reaches `top_p` (last dim)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a symbol when the mass strictly before it already reaches top_p (the first is always kept).
    drop = (probs.cumsum(-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_logits(
    logits: Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Sample one index per row of `logits [..., n]` at `temperature` within the top-p nucleus."""
    filtered = top_p_filter(logits.float() / temperature, top_p)
    probs = filtered.softmax(-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


class CharDecoder:
    """Device-side tables of the char path: exact chars→token lookup and the AutoCorrect gather table."""

    def __init__(self, table: Any, device: str | torch.device = "cpu") -> None:
        from spellm_ds.charset import TokenLookup

        self.device = torch.device(device)
        self.k = int(table.k)
        self.num_chars = int(table.charset.size)
        self.end_id = int(table.charset.end_id)
        self.lookup = TokenLookup(table, self.device)
        ids = np.flatnonzero(table.decodable).astype(np.int64)
        if ids.size == 0:
            raise SpellmError("the char table has no decodable token: the char heads cannot produce any")
        self.cand_ids = torch.from_numpy(ids).to(self.device)  # [V']
        # [k, V'], one contiguous index row per head: head i gathers its log-prob of each token's char i.
        rows = np.ascontiguousarray(table.token_chars[ids].T.astype(np.int64))
        self.cand_chars = torch.from_numpy(rows).to(self.device)

    def autocorrect_scores(self, logp: Tensor) -> Tensor:
        """Scores `[N, V']` of every decodable token: the sum of per-head log-probs of its chars."""
        per_head = logp.transpose(0, 1).contiguous()  # [k, N, C]: each head's rows contiguous
        scores = per_head[0].index_select(1, self.cand_chars[0])
        for i in range(1, self.k):
            scores.add_(per_head[i].index_select(1, self.cand_chars[i]))
        return scores

    def autocorrect(self, logp: Tensor) -> Tensor:
        """The decodable token id `[N]` with the best AutoCorrect score for each row of `logp [N, k, C]`."""
        return self.cand_ids[self.autocorrect_scores(logp).argmax(-1)]

    def decode_chars(self, chars: Tensor) -> Tensor:
        """Token ids `[...]` of char strings `[..., k]` (read up to the first `<end>`), -1 for no token."""
        return self.lookup.lookup(chars)


@dataclass
class DecodeResult:
    """One decode step for N rows."""

    tokens: Tensor  # Long[N] the chosen token ids
    path: Tensor  # Long[N] EXACT (0), AUTOCORRECT (1) or FALLBACK (2)
    entropy: Tensor  # Float[N] mean head entropy (nats)
    chars: Tensor  # Long[N, k] the (canonical) char string of the char path


@dataclass
class GenerateOutput:
    """What `generate` returns."""

    sequences: Tensor  # Long[B, T + new]: the (left-padded) prompt, then new tokens; pad after EOS
    paths: Tensor  # Long[B, new]: EXACT/AUTOCORRECT/FALLBACK per new token, -1 after the row ended
    counters: dict[str, int] = field(default_factory=dict)  # exact, autocorrect, fallback, tokens

    def rates(self) -> dict[str, float]:
        """The counters as shares of the generated tokens."""
        total = max(1, self.counters.get("tokens", 0))
        return {name: self.counters.get(name, 0) / total for name in PATH_NAMES}


# ---------------------------------------------------------------------------------------------------------
# The model


class SpeLLMForCausalLM(nn.Module):
    """A SpeLLM model for inference: HF base model, char heads, char table, entropy-fallback threshold.

    `original_weights` (HF name → tensor) are the original values of the base tensors that training
    changed (the MLPs of the last N layers; `{}` when none changed); with them the fallback can be
    `"exact"`, the default when they are given (see the module doc).
    """

    def __init__(
        self,
        model: nn.Module,
        table: Any,
        tokenizer: Any = None,
        threshold: float | None = PAPER_THRESHOLD,
        config: dict[str, Any] | None = None,
        *,
        original_weights: Mapping[str, Tensor] | None = None,
        fallback: str | None = None,
    ) -> None:
        super().__init__()
        if table.k != model.k or table.charset.size != model.num_chars:
            raise SpellmError(
                f"char table (k={table.k}, {table.charset.size} symbols) does not fit the char heads "
                f"(k={model.k}, {model.num_chars} symbols)"
            )
        self.model = model  # spellm_ds.model.student.SpeLLMModel
        self.table = table
        self.tokenizer = tokenizer
        self.threshold = threshold
        self.spellm_config = dict(config or {})
        self._decoder: CharDecoder | None = None
        if fallback is None:
            fallback = "exact" if original_weights is not None else "approximate"
        if fallback not in FALLBACK_KINDS:
            raise SpellmError(f"fallback must be one of {', '.join(FALLBACK_KINDS)}, got {fallback!r}")
        if fallback == "exact" and original_weights is None:
            raise SpellmError(
                "the exact fallback needs the original weights of the trained MLPs, and this model has none "
                "(an export written without them): use fallback='approximate' or export again"
            )
        self.fallback = fallback
        self.original_mlps = nn.ModuleList()  # original MLPs of layers tail_start..L-1 (exact fallback)
        self.tail_start = len(model.layers)  # L - N: the first layer of the original tail
        if fallback == "exact":
            self._set_original_weights(original_weights or {})

    def _set_original_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Build the original MLPs of layers L-N..L-1 from the original values of the trained tensors."""
        layout, layers = self.model.layout, self.model.layers
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
            return  # nothing trained below the heads: the student's hidden state is the teacher's
        check_attention(self.model.base.config, "the exact fallback (or use fallback='approximate')")
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
        self.original_mlps = nn.ModuleList(mlps)
        self.tail_start = first

    # -- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        *,
        base_model: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        threshold: float | None = None,
        fallback: str | None = None,
        trust_remote_code: bool = False,
    ) -> SpeLLMForCausalLM:
        """Load an export directory (full, or delta on top of `base_model` / the recorded base).

        `fallback`: `"exact"`, `"approximate"`, or None for exact where the export holds the original
        weights of the trained MLPs (see the module doc)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from spellm_ds.fingerprint import tokenizer_hash
        from spellm_ds.model.student import SpeLLMModel

        if fallback not in (None, *FALLBACK_KINDS):
            raise SpellmError(f"fallback must be one of {', '.join(FALLBACK_KINDS)}, got {fallback!r}")
        export = open_export(model_dir, base_model)
        root, cfg, table = export.root, export.config, export.table
        k, num_chars = int(cfg["k"]), int(cfg["num_chars"])
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(root), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise SpellmError(f"{root}: cannot load the tokenizer ({exc})") from None
        tok_hash = tokenizer_hash(tokenizer)
        if table.tokenizer_hash and table.tokenizer_hash != tok_hash:
            raise SpellmError(
                f"{root / CHARSET_FILE} was built for tokenizer {table.tokenizer_hash[:12]}..., but the "
                f"tokenizer in {root} hashes to {tok_hash[:12]}...: charset and tokenizer do not match"
            )
        if fallback == "exact" and not export.has_originals:
            raise SpellmError(
                f"{root} holds no original weights of its trained MLPs ({ORIGINAL_MLPS_FILE}), so the exact "
                "fallback is not available: use fallback='approximate' or export again"
            )
        kind = fallback or ("exact" if export.has_originals else "approximate")
        delta, weights_dir = export.delta, export.weights_dir
        if dtype is None:
            dtype = "auto"
        try:
            base = AutoModelForCausalLM.from_pretrained(
                str(weights_dir), dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise SpellmError(f"{weights_dir}: cannot load the model ({exc})") from None
        originals: dict[str, Tensor] | None = None
        if kind == "exact":
            if delta:  # the base model's own weights, before the delta replaces them
                params = dict(base.named_parameters())
                originals = {n: params[n].detach().clone() for n in delta if n in params}
            else:
                originals = export.original_weights()
        if delta:
            _apply_delta(base, delta, root / DELTA_FILE)
        d = base.config.hidden_size
        w = export.heads
        if tuple(w.shape) != (k * num_chars, d):
            raise SpellmError(
                f"{root / CHAR_HEADS_FILE}: weight has shape {tuple(w.shape)}, expected "
                f"({k * num_chars}, {d}) for k={k}, {num_chars} symbols, hidden size {d}"
            )
        model = SpeLLMModel(base, k, num_chars, trainable_layers=0)
        with torch.no_grad():
            model.char_heads.weight.copy_(w.to(model.char_heads.weight.dtype))
        model.eval()
        if threshold is None:
            threshold = (cfg.get("fallback_thresholds") or {}).get(kind, cfg["fallback_threshold"])
        out = cls(
            model,
            table,
            tokenizer=tokenizer,
            threshold=threshold,
            config=cfg,
            original_weights=originals,
            fallback=kind,
        )
        return out.eval().to(device)

    # -- pieces --------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return self.model.char_heads.weight.device

    @property
    def decoder(self) -> CharDecoder:
        """The char-path tables on the model's device (built on first use and after a device change)."""
        if self._decoder is None or self._decoder.device != self.device:
            self._decoder = CharDecoder(self.table, self.device)
        return self._decoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        """Final hidden state and char logits of every position (`spellm_ds.model.student.SpeLLMOutput`)."""
        return self.model(input_ids, attention_mask=attention_mask)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Logits of the original lm_head on hidden states `[..., d]` (float32)."""
        return self.model.lm_head(hidden).float()

    def original_tail(
        self,
        hidden: Tensor,
        position_ids: Tensor,
        key_mask: Tensor,
        start: int = 0,
        cache: Any = None,
    ) -> Tensor:
        """The original model's final normed hidden states `[n, q, d]` from layer L-N inputs `[n, q, d]`.

        The inputs are columns `start..start+q-1`; `key_mask` Bool[n, start+q] marks real columns;
        `cache` (the tail's KV view) holds the K/V of the columns before `start` (None: `start` is 0).
        """
        if not len(self.original_mlps):
            raise SpellmError("this model has no original tail (approximate fallback, or nothing trained)")
        return run_original_tail(
            self.model, self.original_mlps, self.tail_start, hidden, position_ids, key_mask, start, cache
        )

    @torch.inference_mode()
    def forward_with_original(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Any, Tensor]:
        """The student's output and the original model's final normed hidden state `[B, T, d]` (exact)."""
        if self.fallback != "exact":
            raise SpellmError("forward_with_original needs the exact fallback (this model is approximate)")
        if not len(self.original_mlps):
            out = self.model(input_ids, attention_mask=attention_mask)
            return out, out.hidden
        recorded: list[Tensor] = []
        with self._recording(recorded.append):
            out = self.model(input_ids, attention_mask=attention_mask)
        b, t = input_ids.shape
        keys = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        position = torch.arange(t, device=input_ids.device).expand(b, t)  # the body's own default
        return out, self.original_tail(recorded[0], position, keys)

    @contextlib.contextmanager
    def _recording(self, sink: Callable[[Tensor], None]) -> Iterator[None]:
        """While inside, every input of layer L-N (the first trained layer) goes to `sink`."""
        target = self.model.layers[self.tail_start]

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if module is target:  # not the original tail's twin of this layer, which shares its hooks
                sink(args[0] if args else kwargs["hidden_states"])

        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @torch.inference_mode()
    def decode_step(
        self,
        hidden: Tensor,
        *,
        threshold: float | str | None = "default",
        autocorrect: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        sync_free: bool = False,
        fallback_hidden: Callable[[list[int] | None], Tensor] | None = None,
    ) -> DecodeResult:
        """Choose the next token for each row of final hidden states `[N, d]` (see the module doc).

        `fallback_hidden(rows)` gives the hidden states `[n, d]` the lm_head takes for falling-back rows
        (a sorted list; None: every row); by default the rows of `hidden` (the approximate fallback).
        """
        thr = self.threshold if threshold == "default" else threshold
        dec = self.decoder
        w = self.model.char_heads.weight
        logits = F.linear(hidden.to(w.dtype), w).float().view(hidden.shape[0], dec.k, dec.num_chars)
        logp = logits.log_softmax(-1)
        entropy = mean_head_entropy(logp)
        sampling = temperature > 0
        if sampling:
            chars = sample_logits(logits, temperature, top_p, generator)
        else:
            chars = logits.argmax(-1)
        chars = canonical_chars(chars, dec.end_id)
        tokens = dec.decode_chars(chars)
        miss = tokens < 0
        need_fb = entropy > thr if thr is not None else torch.zeros_like(miss)
        if not autocorrect:
            need_fb = need_fb | miss
        need_ac = miss & ~need_fb
        path = torch.where(need_fb, FALLBACK, torch.where(miss, AUTOCORRECT, EXACT))
        if sync_free:
            if autocorrect:
                ac = self._autocorrect(logits, logp, temperature, top_p, generator)
                tokens = torch.where(need_ac, ac, tokens)
            fb_hidden = hidden if fallback_hidden is None else fallback_hidden(None)
            fb = self._fallback(fb_hidden, temperature, top_p, generator)
            tokens = torch.where(need_fb, fb, tokens)
        else:
            # The one host read of the step: how many rows need AutoCorrect and the fallback (with
            # `fallback_hidden`, which rows fall back). Only those rows are gathered and run through the
            # AutoCorrect table and the full-vocabulary lm_head.
            fb_rows: list[int] | None = None
            if fallback_hidden is None:
                n_ac, n_fb = torch.stack([need_ac.sum(), need_fb.sum()]).tolist()
            else:
                flags = torch.cat([need_ac.sum().view(1), need_fb.long()]).tolist()
                n_ac, fb_rows = flags[0], [i for i, f in enumerate(flags[1:]) if f]
                n_fb = len(fb_rows)
            if n_ac:
                rows = torch.argsort((~need_ac).to(torch.int8), stable=True)[:n_ac]
                ac = self._autocorrect(logits[rows], logp[rows], temperature, top_p, generator)
                tokens = tokens.index_put((rows,), ac)
            if n_fb:
                if fallback_hidden is not None and fb_rows is not None:
                    rows = torch.tensor(fb_rows, device=hidden.device)
                    fb_hidden = fallback_hidden(fb_rows)
                else:
                    rows = torch.argsort((~need_fb).to(torch.int8), stable=True)[:n_fb]
                    fb_hidden = hidden[rows]
                tokens = tokens.index_put((rows,), self._fallback(fb_hidden, temperature, top_p, generator))
        return DecodeResult(tokens=tokens, path=path, entropy=entropy, chars=chars)

    def _autocorrect(
        self,
        logits: Tensor,
        logp: Tensor,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        dec = self.decoder
        if temperature > 0:
            scores = dec.autocorrect_scores((logits / temperature).log_softmax(-1))
            return dec.cand_ids[sample_logits(scores, 1.0, top_p, generator)]
        return dec.autocorrect(logp)

    def _fallback(
        self, hidden: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
    ) -> Tensor:
        lm = self.lm_logits(hidden)
        return sample_logits(lm, temperature, top_p, generator) if temperature > 0 else lm.argmax(-1)

    # -- generation ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        threshold: float | str | None = "default",
        autocorrect: bool = True,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        sync_free: bool = False,
        eos_check_every: int = 1,
    ) -> GenerateOutput:
        """Generate up to `max_new_tokens` per row with a KV cache; prompts are left-padded in `input_ids`.

        A row ends at its first EOS (`eos_token_id`, default: the model's generation config; `[]` for none)
        and is padded with `pad_token_id` after it; the loop stops once every row ended (checked every
        `eos_check_every` steps: with `sync_free=True` and a large value a step reads nothing back).
        Fallback rows take the model's `fallback` kind (exact: the original tail catches up, module doc).
        """
        if max_new_tokens < 1 or eos_check_every < 1:
            raise SpellmError(
                f"max_new_tokens and eos_check_every must be >= 1, got {max_new_tokens}, {eos_check_every}"
            )
        if temperature < 0 or not 0 < top_p <= 1:
            raise SpellmError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        device = self.device
        input_ids = input_ids.to(device)
        b = input_ids.shape[0]
        thr = self.threshold if threshold == "default" else threshold
        exact: ExactFallback | None = None
        if self.fallback == "exact" and len(self.original_mlps) and (thr is not None or not autocorrect):
            exact = ExactFallback(self, b, input_ids.shape[1] + max_new_tokens)
        with self._recording(exact.record) if exact else contextlib.nullcontext():
            return self._generate(
                input_ids,
                attention_mask,
                exact,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                threshold=thr,
                autocorrect=autocorrect,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                generator=generator,
                sync_free=sync_free,
                eos_check_every=eos_check_every,
            )

    def _generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        exact: ExactFallback | None,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        threshold: float | None,
        autocorrect: bool,
        eos_token_id: int | list[int] | None,
        pad_token_id: int | None,
        generator: torch.Generator | None,
        sync_free: bool,
        eos_check_every: int,
    ) -> GenerateOutput:
        """The decode loop of `generate` (arguments checked and resolved there)."""
        device = self.device
        b = input_ids.shape[0]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        eos_ids = self._eos_ids(eos_token_id)
        pad = self._pad_id(pad_token_id, eos_ids)
        eos_t = torch.tensor(eos_ids or [-1], device=device)
        position = mask.cumsum(-1) - 1
        position = position.masked_fill(mask == 0, 1)
        body = self.model.body
        cache_kw = cache_kwarg(body)
        out = body(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True)
        cache = returned_cache(out)
        hidden = out.last_hidden_state[:, -1]
        next_pos = position[:, -1:] + 1
        done = torch.zeros(b, dtype=torch.bool, device=device)
        counts = torch.zeros(len(PATH_NAMES), dtype=torch.long, device=device)
        new_tokens: list[Tensor] = []
        new_paths: list[Tensor] = []
        for step in range(max_new_tokens):
            if exact is not None:
                exact.mask = mask
            res = self.decode_step(
                hidden,
                threshold=threshold,
                autocorrect=autocorrect,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                sync_free=sync_free,
                fallback_hidden=None if exact is None else exact.hidden,
            )
            active = ~done
            counts += (F.one_hot(res.path, len(PATH_NAMES)) * active[:, None]).sum(0)
            tok = torch.where(active, res.tokens, torch.full_like(res.tokens, pad))
            new_tokens.append(tok)
            new_paths.append(torch.where(active, res.path, torch.full_like(res.path, -1)))
            done = done | torch.isin(tok, eos_t)
            if step + 1 == max_new_tokens:
                break
            if (step + 1) % eos_check_every == 0 and bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = body(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=next_pos,
                use_cache=True,
                **{cache_kw: cache},
            )
            cache = returned_cache(out)
            hidden = out.last_hidden_state[:, -1]
            next_pos = next_pos + 1
        tokens = torch.stack(new_tokens, 1)
        paths = torch.stack(new_paths, 1)
        # Drop trailing steps taken after every row had ended (eos_check_every > 1 overshoots).
        alive = (paths >= 0).any(0)
        keep = int(alive.nonzero().max()) + 1 if bool(alive.any()) else 1
        tokens, paths = tokens[:, :keep], paths[:, :keep]
        c = counts.tolist()
        counters = {name: int(n) for name, n in zip(PATH_NAMES, c)}
        counters["tokens"] = int(sum(c))
        return GenerateOutput(sequences=torch.cat([input_ids, tokens], 1), paths=paths, counters=counters)

    def generate_text(
        self, prompts: list[str], *, max_new_tokens: int = 32, **kwargs: Any
    ) -> tuple[list[str], GenerateOutput]:
        """Generate continuations of text prompts (left-padded batch); returns the new text per prompt."""
        tok = self.tokenizer
        if tok is None:
            raise SpellmError("this model has no tokenizer; pass token ids to generate()")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        out = self.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, **kwargs)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        texts = [
            tok.decode(row[out.paths[i] >= 0].tolist(), skip_special_tokens=True) for i, row in enumerate(new)
        ]
        return texts, out

    def _eos_ids(self, eos_token_id: int | list[int] | None) -> list[int]:
        if eos_token_id is None:
            gen = getattr(self.model.base, "generation_config", None)
            eos_token_id = getattr(gen, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = getattr(self.model.base.config, "eos_token_id", None)
        if eos_token_id is None:
            return []
        return [int(x) for x in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]

    def _pad_id(self, pad_token_id: int | None, eos_ids: list[int]) -> int:
        if pad_token_id is not None:
            return int(pad_token_id)
        for src in (getattr(self.model.base, "generation_config", None), self.model.base.config):
            pid = getattr(src, "pad_token_id", None)
            if pid is not None:
                return int(pid)
        return eos_ids[0] if eos_ids else 0


def _apply_delta(base: nn.Module, delta: dict[str, Tensor], where: Path) -> None:
    """Copy delta tensors (HF names) into the base model's parameters."""
    params = dict(base.named_parameters())
    missing = [n for n in delta if n not in params]
    if missing:
        raise SpellmError(f"{where}: tensors {missing[:5]} are not parameters of the base model")
    with torch.no_grad():
        for name, t in delta.items():
            params[name].copy_(t.to(params[name].dtype))
