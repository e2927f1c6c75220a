"""An exported SpeLLM model for inference: loading an export directory, the decode step, generation.

`SpeLLMForCausalLM` holds the HF base model with its char heads (`spellm_ds.model.student.SpeLLMModel`),
the char table, the tokenizer and the entropy-fallback threshold. `decode_step` chooses the next token
of every row of a batch of final hidden states: the char path (`spellm_ds.inference.decode`: heads,
chars→token lookup, AutoCorrect, entropy) and, for unsure rows, the model's fallback kind
(`spellm_ds.inference.fallback`: `"approximate"`, the lm_head on the student's state, or `"exact"`, the
teacher's own prediction from the original tail).

Generation (`generate`): one prefill of the left-padded prompts, then one body step per new token with
the body's KV cache. With the exact fallback a forward pre-hook on layer L-N records its input for every
new position and the original tail catches up only for rows that fall back
(`spellm_ds.inference.fallback.ExactFallback`). Host syncs: the counters (exact hits, AutoCorrect,
fallback) are device tensors read once per `generate` call; besides the one read of each decode step
(none with `sync_free=True`), `generate` reads one "all rows ended" boolean every `eos_check_every`
steps.

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
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from spellm_ds.inference.batching import eos_ids as resolve_eos_ids
from spellm_ds.inference.decode import PATH_NAMES, CharDecoder, DecodeResult, decode_hidden, sample_logits
from spellm_ds.inference.fallback import (
    FALLBACK_KINDS,
    ExactFallback,
    build_original_mlps,
    record_layer_inputs,
)
from spellm_ds.model.tail import cache_kwarg, returned_cache, run_original_tail


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
            self.original_mlps, self.tail_start = build_original_mlps(model, original_weights or {})

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
        with self.recording(recorded.append):
            out = self.model(input_ids, attention_mask=attention_mask)
        b, t = input_ids.shape
        keys = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        position = torch.arange(t, device=input_ids.device).expand(b, t)  # the body's own default
        return out, self.original_tail(recorded[0], position, keys)

    def recording(self, sink: Callable[[Tensor], None]) -> contextlib.AbstractContextManager[None]:
        """While inside, every input of layer L-N (the first trained layer) goes to `sink`."""
        return record_layer_inputs(self.model.layers[self.tail_start], sink)

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
        """Choose the next token for each row of final hidden states `[N, d]` (`spellm_ds.inference.decode`).

        `fallback_hidden(rows)` gives the hidden states `[n, d]` the lm_head takes for falling-back rows
        (a sorted list; None: every row); by default the rows of `hidden` (the approximate fallback).
        """
        thr = self.threshold if threshold == "default" else threshold
        return decode_hidden(
            self.decoder,
            self.model.char_heads.weight,
            hidden,
            lambda h: self.fallback_tokens(h, temperature, top_p, generator),
            threshold=thr,
            autocorrect=autocorrect,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            sync_free=sync_free,
            fallback_hidden=fallback_hidden,
        )

    def fallback_tokens(
        self, hidden: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
    ) -> Tensor:
        """The fallback's token ids `[n]` for hidden states `[n, d]`: the lm_head's argmax, or a sample."""
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
        with self.recording(exact.record) if exact else contextlib.nullcontext():
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
        eos_ids = resolve_eos_ids(self.model.base, eos_token_id)
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
