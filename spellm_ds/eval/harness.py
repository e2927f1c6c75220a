"""lm-evaluation-harness (0.4.10+) model `spellm`: a SpeLLM export scored and decoded as it serves text.

Registration: importing this module registers the class under `spellm` with lm-eval's `register_model`.
lm-eval 0.4.x has no plugin entry point, so the module must be imported before lm-eval resolves the name
(the `lm_eval` command alone does not know `spellm`). From Python: `import spellm_ds.eval.harness`, then
`lm_eval.simple_evaluate(model="spellm", ...)`. From the shell, `python -m spellm_ds.eval.harness ARGS`
imports it and runs lm-eval's own command line with the same arguments, e.g.
`python -m spellm_ds.eval.harness run --model spellm --model_args pretrained=DIR,fallback=exact --tasks T`.
`spellm-ds lm-eval-local` (`spellm_ds.eval.local_run.evaluate_local`) runs local task YAMLs offline.

Model arguments (`--model_args`):

- `pretrained`: the export directory; `base_model`: the base of a delta export (default: the recorded one).
- `fallback`: `exact` (the original model's own prediction; needs the original MLPs in the export),
  `approximate` (the original lm_head on the student's final hidden state); default: exact where the
  export holds the original MLPs.
- `threshold`: mean head entropy (nats) above which a position falls back; `default` (the default) is the
  export's calibrated threshold for that fallback kind, `none` never falls back on entropy, a negative
  value falls back everywhere (the fallback model alone: with `fallback=exact`, the base model).
- `stop_check_tokens` (default 16): generation runs in chunks of this many tokens, then twice as many,
  and so on, each chunk a fresh `generate` call on the prompt plus the tokens so far; a row stops after
  the chunk in which one of its stop sequences appeared (0: one chunk of `max_gen_toks`). Either way the
  text is cut at the first stop sequence, as lm-eval does for `hf`.
- `device`, `dtype` (default `auto`), `batch_size`, `max_length`, `trust_remote_code`; other arguments go
  to lm-eval's `HFLM` (tokenization, batching, chat templates are its own). One process: the model does
  not split requests over `accelerate launch` ranks.

Scoring (`loglikelihood`, `loglikelihood_rolling`): the model is lm-eval's `HFLM` on the SpeLLM export's
base model with the per-position log-probabilities replaced (`score_positions`), so tokenization, context
windows, batching and the greedy check are exactly those of lm-eval's `hf` model. At position t let
`log p_i(c)` be head i's log-probs, D the decodable tokens (those whose own END-padded row of the `[V, k]`
char table looks up to them), q the fallback's next-token distribution, and `Q = Σ_{v∉D} q(v)`.

- char path (mean head entropy ≤ threshold, or threshold `none`): a decodable token v scores
  `s_v = Σ_i log p_i(chars[v, i])`, the AutoCorrect score (`CharDecoder.autocorrect_scores`), normalised
  over D by a log-softmax. The heads cannot spell a token outside D, so such a token gets the fallback's
  probability, and the whole is renormalised over the vocabulary:
  `log P(v) = s_v − logsumexp_{u∈D} s_u − log(1 + Q)` for v in D, `log q(v) − log(1 + Q)` for v not in D.
  When every token is decodable this is the log-softmax of the AutoCorrect scores; it always sums to one
  over the vocabulary, so perplexities stay perplexities.
- fallback (mean head entropy > threshold): `log q(v)`, the fallback's log-softmax: exact, the original
  model's logits at t (`SpeLLMForCausalLM.forward_with_original`: the original tail over the sequence in
  one pass, run whenever the fallback is exact, since Q needs it too); approximate, the original lm_head
  on the student's final hidden state at t.
- `is_greedy` (lm-eval's exact-match flag) is, as for `hf`, the continuation being the argmax of these
  distributions at every position.

Generation (`generate_until`): `SpeLLMForCausalLM.generate` on lm-eval's left-padded batches, greedy
(the char path's argmax string, AutoCorrect for strings that are no token) or sampling when `do_sample`
is true (`temperature`, default 1.0, and `top_p`, as `generate` samples); `max_gen_toks` new tokens at
most, rows end at EOS, and the stop sequences (`until`, plus the EOS string) cut the decoded text as lm-eval
does for `hf`. Other generation arguments are refused unless they are no-ops (`top_k` 0/None, `num_beams`
1, `repetition_penalty` 1).

Counters (`SpeLLMEvalLM.counters`, per request type: `loglikelihood`, `loglikelihood_rolling`,
`generate_until`, accumulated over the run): `positions` scored or tokens generated, and how many of them
took each path: `exact` (the heads' argmax string is a token), `autocorrect` (it is not: the char path
rests on the AutoCorrect scores), `fallback` (entropy above the threshold). For scoring this labels each
scored position the way the decode step would, whatever the target token. `rates()` gives them as shares;
each request call logs them on lm-eval's logger (`lm_eval.models.spellm`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from torch import Tensor

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models register before ours)
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "spellm_ds.eval.harness needs lm-evaluation-harness >= 0.4.10, < 0.5: pip install 'spellm-ds[eval]'"
    ) from exc

from spellm_ds.dist import default_device
from spellm_ds.errors import SpellmError
from spellm_ds.inference.batching import eos_ids, left_pad
from spellm_ds.inference.decode import (
    AUTOCORRECT,
    EXACT,
    FALLBACK,
    PATH_NAMES,
    canonical_chars,
    mean_head_entropy,
)
from spellm_ds.inference.model import SpeLLMForCausalLM

logger = logging.getLogger("lm_eval.models.spellm")

REQUEST_KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
_NO_OP_GEN_KWARGS = {"top_k": (None, 0), "num_beams": (None, 1), "repetition_penalty": (None, 1, 1.0)}
_IGNORED_GEN_KWARGS = ("use_cache", "pad_token_id")


def parse_threshold(value: Any) -> float | str | None:
    """A `threshold` model argument as a float, `"default"` (the export's) or None (never fall back)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
        return None
    if isinstance(value, str) and value.strip().lower() == "default":
        return "default"
    if isinstance(value, bool):
        raise SpellmError(f"threshold must be a number, 'default' or 'none', got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SpellmError(f"threshold must be a number, 'default' or 'none', got {value!r}") from None


@register_model("spellm")
class SpeLLMEvalLM(HFLM):
    """lm-eval model `spellm`: an export's char heads with entropy fallback (definitions: module doc)."""

    def __init__(
        self,
        pretrained: str | os.PathLike,
        fallback: str | None = None,
        threshold: Any = "default",
        base_model: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        stop_check_tokens: int = 16,
        **kwargs: Any,
    ) -> None:
        if fallback is not None and str(fallback).lower() in ("", "none", "default"):
            fallback = None
        device = default_device(device)
        if int(stop_check_tokens) < 0:
            raise SpellmError(f"stop_check_tokens must be >= 0, got {stop_check_tokens}")
        thr = parse_threshold(threshold)
        spellm = SpeLLMForCausalLM.from_pretrained(
            pretrained,
            base_model=base_model,
            device=device,
            dtype=dtype,
            fallback=fallback,
            trust_remote_code=bool(trust_remote_code),
        )
        for name in ("backend", "tokenizer", "pretrained"):
            kwargs.pop(name, None)
        super().__init__(
            pretrained=spellm.model.base,
            backend="causal",
            tokenizer=spellm.tokenizer,
            device=device,
            **kwargs,
        )
        self.spellm = spellm
        self.threshold: float | None = spellm.threshold if thr == "default" else thr
        self.fallback = spellm.fallback
        self.export_dir = str(pretrained)
        self.stop_check_tokens = int(stop_check_tokens)
        self.counters: dict[str, dict[str, int]] = {kind: _zero_counts() for kind in REQUEST_KINDS}
        self._kind = "loglikelihood"
        self._paths: Tensor | None = None  # path per position of the last `_model_call` batch
        self._row = 0
        self._eos = eos_ids(spellm.model.base)
        logger.info("spellm: %s, %s fallback, threshold %s", self.export_dir, self.fallback, self.threshold)

    # -- counters ------------------------------------------------------------------------------------------

    def rates(self) -> dict[str, dict[str, float]]:
        """Per request type, the share of positions (or generated tokens) that took each path."""
        out = {}
        for kind, c in self.counters.items():
            total = max(1, c["positions"])
            out[kind] = {name: c[name] / total for name in PATH_NAMES}
        return out

    def _log_counters(self, kind: str, before: dict[str, int]) -> None:
        c = self.counters[kind]
        new = {name: c[name] - before[name] for name in c}
        if not new["positions"]:
            return
        shares = ", ".join(f"{name} {100 * new[name] / new['positions']:.1f}%" for name in PATH_NAMES)
        logger.info(
            "spellm %s: %d %s: %s (%s fallback, threshold %s)",
            kind,
            new["positions"],
            "generated tokens" if kind == "generate_until" else "scored positions",
            shares,
            self.fallback,
            self.threshold,
        )

    def _counted(self, kind: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        previous, self._kind = self._kind, kind
        before = dict(self.counters[kind])
        try:
            return fn(*args, **kwargs)
        finally:
            self._kind = previous
            self._log_counters(kind, before)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's `loglikelihood` with SpeLLM scores (module doc), counting the scored positions."""
        return self._counted("loglikelihood", super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """lm-eval's `loglikelihood_rolling` with SpeLLM scores (module doc), counting scored positions."""
        return self._counted(
            "loglikelihood_rolling", super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm
        )

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """lm-eval's `generate_until` through `SpeLLMForCausalLM.generate`, counting the generated tokens."""
        return self._counted("generate_until", super().generate_until, requests, disable_tqdm=disable_tqdm)

    # -- scoring -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score_positions(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Next-token log-probs `[B, T, V]` (float32) at every position, and the path `[B, T]` of each."""
        sp = self.spellm
        input_ids = input_ids.to(sp.device)
        if sp.fallback == "exact":
            out, fb_hidden = sp.forward_with_original(input_ids)
        else:
            out = sp(input_ids)
            fb_hidden = out.hidden
        dec = sp.decoder
        b = input_ids.shape[0]
        head_logp = out.char_logits.float().log_softmax(-1)  # [B, T, k, C]
        entropy = mean_head_entropy(head_logp)
        falls = entropy > self.threshold if self.threshold is not None else torch.zeros_like(entropy).bool()
        tokens = dec.decode_chars(canonical_chars(head_logp.argmax(-1), dec.end_id))
        paths = torch.where(falls, FALLBACK, torch.where(tokens < 0, AUTOCORRECT, EXACT))
        rows = []
        for i in range(b):  # one row at a time: a few [T, V] tensors, never [B, T, V] copies
            q = sp.lm_logits(fb_hidden[i]).log_softmax(-1)  # [T, V]
            char = dec.autocorrect_scores(head_logp[i]).log_softmax(-1)  # [T, V']
            mixed = q.clone()
            mixed[:, dec.cand_ids] = char
            mixed = mixed.log_softmax(-1)  # - log(1 + Q): the fallback's mass on tokens outside D
            rows.append(torch.where(falls[i, :, None], q, mixed))
        return torch.stack(rows), paths

    def _model_call(
        self, inps: Tensor, attn_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        if attn_mask is not None or labels is not None:
            raise SpellmError("the spellm model is a causal LM: no encoder mask or labels")
        logp, self._paths = self.score_positions(inps)
        self._row = 0
        return logp

    def _select_cont_toks(
        self, logits: Tensor, contlen: int | None = None, inplen: int | None = None
    ) -> Tensor:
        # lm-eval calls this once per row of the last `_model_call` batch, in order: count what it scores.
        if self._paths is not None and self._row < len(self._paths) and contlen and inplen:
            _add_paths(self.counters[self._kind], self._paths[self._row, inplen - contlen : inplen])
        self._row += 1
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    # -- generation ----------------------------------------------------------------------------------------

    def _sampling(self, gen: dict[str, Any]) -> tuple[float, float]:
        """(temperature, top_p) from lm-eval generation kwargs; temperature 0 is greedy."""
        gen = dict(gen)
        do_sample = gen.pop("do_sample", None)
        temperature = gen.pop("temperature", None)
        top_p = gen.pop("top_p", None)
        for name, allowed in _NO_OP_GEN_KWARGS.items():
            if name in gen and gen.pop(name) not in allowed:
                raise SpellmError(f"the spellm model does not support the generation argument {name}")
        for name in _IGNORED_GEN_KWARGS:
            gen.pop(name, None)
        if gen:
            raise SpellmError(f"the spellm model does not support the generation arguments {sorted(gen)}")
        top_p = 1.0 if top_p is None else float(top_p)
        if do_sample is None:
            do_sample = bool(temperature)
        if not do_sample:
            return 0.0, top_p
        temperature = 1.0 if temperature is None else float(temperature)
        return max(temperature, 0.0), top_p

    def _model_generate(
        self, context: Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> Tensor:
        attention_mask = generation_kwargs.pop("attention_mask", None)
        temperature, top_p = self._sampling(generation_kwargs)
        sp, tok = self.spellm, self.tokenizer
        b, width = context.shape
        budget = max_length - width
        pad = tok.pad_token_id if tok.pad_token_id is not None else self._eos[0] if self._eos else 0
        mask = torch.ones_like(context) if attention_mask is None else attention_mask
        prompts = [context[i][mask[i].bool()].tolist() for i in range(b)]
        new: list[list[int]] = [[] for _ in range(b)]
        stops = [s for s in stop or [] if s]
        active = list(range(b))
        chunk = budget if self.stop_check_tokens == 0 else min(budget, self.stop_check_tokens)
        produced = 0  # new tokens of every row still active
        counts = self.counters["generate_until"]
        while active and chunk > 0:
            ids, am = left_pad([prompts[i] + new[i] for i in active], pad)
            out = sp.generate(
                ids.to(sp.device),
                am.to(sp.device),
                max_new_tokens=chunk,
                temperature=temperature,
                top_p=top_p,
                threshold=self.threshold,
                eos_token_id=self._eos,
                pad_token_id=pad,
            )
            for name in PATH_NAMES:
                counts[name] += out.counters[name]
            counts["positions"] += out.counters["tokens"]
            produced += chunk
            still = []
            for j, i in enumerate(active):
                toks = out.sequences[j, ids.shape[1] :][out.paths[j] >= 0].tolist()
                new[i] += toks
                ended = len(toks) < chunk or any(t in self._eos for t in toks)
                text = tok.decode(new[i], skip_special_tokens=False)
                if not ended and not any(s in text for s in stops):
                    still.append(i)
            active = still
            chunk = min(2 * chunk, budget - produced)
        longest = max((len(row) for row in new), default=0)
        out_ids = torch.full((b, width + longest), pad, dtype=context.dtype)
        out_ids[:, :width] = context.cpu()
        for i, row in enumerate(new):
            out_ids[i, width : width + len(row)] = torch.tensor(row, dtype=context.dtype)
        return out_ids.to(context.device)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model: size, dtype and the SpeLLM settings (no hub look-up)."""
        base = self.spellm.model.base
        return {
            "model_num_parameters": sum(p.numel() for p in self.spellm.parameters()),
            "model_dtype": str(base.dtype),
            "spellm_export": self.export_dir,
            "spellm_fallback": self.fallback,
            "spellm_threshold": self.threshold,
        }


def _zero_counts() -> dict[str, int]:
    return {"positions": 0, **{name: 0 for name in PATH_NAMES}}


def _add_paths(counts: dict[str, int], paths: Tensor) -> None:
    """Add the path labels `[n]` (EXACT/AUTOCORRECT/FALLBACK) to a counter dict."""
    per = torch.bincount(paths.reshape(-1).cpu(), minlength=len(PATH_NAMES)).tolist()
    for name, n in zip(PATH_NAMES, per):
        counts[name] += int(n)
    counts["positions"] += int(paths.numel())


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the `spellm` model registered (`python -m spellm_ds.eval.harness`)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:  # pragma: no cover - depends on the installed lm-eval
        raise SpellmError(f"this lm-eval has no command line entry point ({exc})") from None
    cli_evaluate()


if __name__ == "__main__":
    main()
