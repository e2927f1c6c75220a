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
5. Entropy fallback: `H = mean_i entropy(softmax(logits_i))`; rows with `H > threshold` take the argmax of
   the original lm_head on the same hidden state. `threshold=None` never falls back on entropy; a negative
   threshold falls back on every row (the base model's own decode).

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

Loading: `SpeLLMForCausalLM.from_pretrained(DIR)` reads an export directory (spellm_ds.export writes
it); a delta export is applied on top of the base model its `spellm_config.json` records (or the one
given). Every file is checked before the model is built, so a bad directory raises `SpellmError` and
nothing is half-loaded. Torch files are never unpickled; remote code runs only with
`trust_remote_code=True`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spellm_ds.errors import SpellmError

EXACT, AUTOCORRECT, FALLBACK = 0, 1, 2
PATH_NAMES = ("exact", "autocorrect", "fallback")
SPELLM_CONFIG = "spellm_config.json"
CHAR_HEADS_FILE = "char_heads.safetensors"
CHARSET_FILE = "charset.json"
DELTA_FILE = "delta.safetensors"
EXPORT_FORMAT = "spellm-ds-export"
EXPORT_VERSION = 1
PAPER_THRESHOLD = 0.22  # mean head entropy (nats) the paper falls back above


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
# Export-directory checks shared with spellm_ds.export


def read_spellm_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check `spellm_config.json` of an export directory."""
    path = Path(model_dir) / SPELLM_CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpellmError(f"{model_dir} is not a complete SpeLLM export (no {SPELLM_CONFIG})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpellmError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT:
        raise SpellmError(f"{path}: not a SpeLLM export config (format is not {EXPORT_FORMAT!r})")
    if cfg.get("format_version") != EXPORT_VERSION:
        raise SpellmError(f"{path}: format_version {cfg.get('format_version')!r}, expected {EXPORT_VERSION}")
    missing = [
        key for key in ("k", "num_chars", "charset_hash", "delta", "fallback_threshold") if key not in cfg
    ]
    if missing:
        raise SpellmError(f"{path}: missing fields {', '.join(missing)}")
    return cfg


def _model_files(model_dir: Path) -> list[Path]:
    """The HF weight files of a full model directory (index-listed shards or one model.safetensors)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SpellmError(f"{index}: not a valid safetensors index ({exc})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise SpellmError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in safetensors files, after checking each file is complete."""
    from spellm_ds.export import read_safetensors_header

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        for name, (_dtype, shape) in read_safetensors_header(f).items():
            shapes[name] = shape
    return shapes


# ---------------------------------------------------------------------------------------------------------
# The model


class SpeLLMForCausalLM(nn.Module):
    """A SpeLLM model for inference: HF base model, char heads, char table, entropy-fallback threshold."""

    def __init__(
        self,
        model: nn.Module,
        table: Any,
        tokenizer: Any = None,
        threshold: float | None = PAPER_THRESHOLD,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if table.k != model.k or table.charset.size != model.num_chars:
            raise SpellmError(
                f"char table (k={table.k}, {table.charset.size} symbols) does not fit the char heads "
                f"(k={model.k}, {model.num_chars} symbols)"
            )
        self.model = model  # spellm_ds.model.SpeLLMModel
        self.table = table
        self.tokenizer = tokenizer
        self.threshold = threshold
        self.spellm_config = dict(config or {})
        self._decoder: CharDecoder | None = None

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
        trust_remote_code: bool = False,
    ) -> SpeLLMForCausalLM:
        """Load an export directory (full, or delta on top of `base_model` / the recorded base)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from spellm_ds.charset import CharTable
        from spellm_ds.export import load_safetensors
        from spellm_ds.fingerprint import tokenizer_hash
        from spellm_ds.model import SpeLLMModel

        root = Path(model_dir)
        if not root.is_dir():
            raise SpellmError(f"model directory {root} does not exist")
        cfg = read_spellm_config(root)
        table = CharTable.load(root / CHARSET_FILE, expected_hash=cfg["charset_hash"])
        k, num_chars = int(cfg["k"]), int(cfg["num_chars"])
        if table.k != k or table.charset.size != num_chars:
            raise SpellmError(
                f"{root / CHARSET_FILE}: k={table.k}, {table.charset.size} symbols; "
                f"{SPELLM_CONFIG} says k={k}, {num_chars} symbols"
            )
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

        heads = load_safetensors(root / CHAR_HEADS_FILE)
        if set(heads) != {"weight"}:
            raise SpellmError(
                f"{root / CHAR_HEADS_FILE}: expected one tensor 'weight', found {sorted(heads)}"
            )
        if cfg["delta"]:
            base_dir = Path(base_model or (cfg.get("base_model") or {}).get("path") or "")
            delta = load_safetensors(root / DELTA_FILE)
            _check_delta_base(base_dir, cfg, delta, root)
            weights_dir = base_dir
        else:
            delta = {}
            weights_dir = root
            tensor_shapes(_model_files(root))  # every shard present and complete before loading
        if dtype is None:
            dtype = "auto"
        try:
            base = AutoModelForCausalLM.from_pretrained(
                str(weights_dir), dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise SpellmError(f"{weights_dir}: cannot load the model ({exc})") from None
        if delta:
            _apply_delta(base, delta, root / DELTA_FILE)
        d = base.config.hidden_size
        w = heads["weight"]
        if tuple(w.shape) != (k * num_chars, d):
            raise SpellmError(
                f"{root / CHAR_HEADS_FILE}: weight has shape {tuple(w.shape)}, expected "
                f"({k * num_chars}, {d}) for k={k}, {num_chars} symbols, hidden size {d}"
            )
        model = SpeLLMModel(base, k, num_chars, trainable_layers=0)
        with torch.no_grad():
            model.char_heads.weight.copy_(w.to(model.char_heads.weight.dtype))
        model.eval()
        thr = cfg["fallback_threshold"] if threshold is None else threshold
        out = cls(model, table, tokenizer=tokenizer, threshold=thr, config=cfg)
        return out.to(device)

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
        """Final hidden state and char logits of every position (`spellm_ds.model.SpeLLMOutput`)."""
        return self.model(input_ids, attention_mask=attention_mask)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Logits of the original lm_head on hidden states `[..., d]` (float32)."""
        return self.model.lm_head(hidden).float()

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
    ) -> DecodeResult:
        """Choose the next token for each row of final hidden states `[N, d]` (see the module doc)."""
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
            fb = self._fallback(hidden, temperature, top_p, generator)
            tokens = torch.where(need_fb, fb, tokens)
        else:
            # The one host read of the step: how many rows need AutoCorrect and the fallback. Only those
            # rows are gathered and run through the AutoCorrect table and the full-vocabulary lm_head.
            n_ac, n_fb = torch.stack([need_ac.sum(), need_fb.sum()]).tolist()
            if n_ac:
                rows = torch.argsort((~need_ac).to(torch.int8), stable=True)[:n_ac]
                ac = self._autocorrect(logits[rows], logp[rows], temperature, top_p, generator)
                tokens = tokens.index_put((rows,), ac)
            if n_fb:
                rows = torch.argsort((~need_fb).to(torch.int8), stable=True)[:n_fb]
                tokens = tokens.index_put(
                    (rows,), self._fallback(hidden[rows], temperature, top_p, generator)
                )
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
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        eos_ids = self._eos_ids(eos_token_id)
        pad = self._pad_id(pad_token_id, eos_ids)
        eos_t = torch.tensor(eos_ids or [-1], device=device)
        position = mask.cumsum(-1) - 1
        position = position.masked_fill(mask == 0, 1)
        body = self.model.body
        cache_kw = _cache_kwarg(body)
        out = body(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True)
        cache = _returned_cache(out)
        hidden = out.last_hidden_state[:, -1]
        next_pos = position[:, -1:] + 1
        done = torch.zeros(b, dtype=torch.bool, device=device)
        counts = torch.zeros(len(PATH_NAMES), dtype=torch.long, device=device)
        new_tokens: list[Tensor] = []
        new_paths: list[Tensor] = []
        for step in range(max_new_tokens):
            res = self.decode_step(
                hidden,
                threshold=threshold,
                autocorrect=autocorrect,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                sync_free=sync_free,
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
            cache = _returned_cache(out)
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


def _cache_kwarg(body: nn.Module) -> str:
    """The name under which this transformers version's model body takes the KV cache."""
    import inspect

    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _check_delta_base(base_dir: Path, cfg: dict[str, Any], delta: dict[str, Tensor], where: Path) -> None:
    """Refuse a base model that is missing or differs in architecture, shapes or weights from the record."""
    from transformers import AutoConfig

    from spellm_ds.fingerprint import config_hash, weights_hash

    if not str(base_dir) or not (base_dir / "config.json").is_file():
        raise SpellmError(
            f"{where} is a delta export; its base model {str(base_dir) or '(none recorded)'} is not a model "
            "directory: pass the base model's directory (--base-model)"
        )
    rec = cfg.get("base_model") or {}
    try:
        base_cfg = AutoConfig.from_pretrained(str(base_dir))
    except (OSError, ValueError) as exc:
        raise SpellmError(f"{base_dir}: cannot read config.json ({exc})") from None
    shapes = tensor_shapes(_model_files(base_dir))
    bad = [
        f"{name} {tuple(t.shape)} vs base {shapes.get(name)}"
        for name, t in delta.items()
        if shapes.get(name) != tuple(t.shape)
    ]
    if bad:
        raise SpellmError(
            f"{where / DELTA_FILE} does not fit the base model {base_dir}: " + "; ".join(bad[:5])
        )
    if rec.get("config_hash") and config_hash(base_cfg) != rec["config_hash"]:
        raise SpellmError(
            f"base model {base_dir} has another architecture config than the one the delta was trained on"
        )
    if rec.get("weights_hash") and weights_hash(base_dir) != rec["weights_hash"]:
        raise SpellmError(
            f"base model {base_dir} has other weight files than the ones the delta was trained on "
            f"(weights hash {rec['weights_hash'][:12]}... recorded)"
        )


def _apply_delta(base: nn.Module, delta: dict[str, Tensor], where: Path) -> None:
    """Copy delta tensors (HF names) into the base model's parameters."""
    params = dict(base.named_parameters())
    missing = [n for n in delta if n not in params]
    if missing:
        raise SpellmError(f"{where}: tensors {missing[:5]} are not parameters of the base model")
    with torch.no_grad():
        for name, t in delta.items():
            params[name].copy_(t.to(params[name].dtype))
