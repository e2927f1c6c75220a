"""SpeLLM losses and metrics as pure tensor functions (no process group, no model).

Shapes: positions are flattened to N (any leading dims of the inputs are folded), K teacher candidates
per position (5 in the shards, sorted by teacher log-prob), k char heads, C = |charset| symbols, V the
vocabulary, d the hidden size. Position t's candidates are the teacher's top-K for token t+1, so char
logits at t are scored against the candidates at t with no shift.

- Char loss (`char_selection_loss`): each candidate's `[k]` char row from the END-padded `[V, k]` table
  is scored under the k heads as the sum of per-head cross-entropies (END positions included, they are
  part of the spelling). Per position one candidate is selected under `no_grad` among the eligible ones
  (`CharTable.decodable`, inside the table): `lowest` takes the lowest score (the paper), `teacher_prior`
  the lowest `score - tau * teacher_logprob`. Ties go to the teacher's more likely candidate. The loss is
  the mean selected score over valid positions (loss mask set and at least one eligible candidate);
  masked-in positions with no eligible candidate are counted.
- Token regularizer (`token_regularizer`): the frozen lm_head on the student's final hidden state, over
  the FULL vocabulary softmax. `kl6` is KL(teacher || student) over the K candidates plus one bucket for
  everything else (the teacher's rest mass is 1 - sum exp(logprob), since shard log-probs are full-vocab
  values); `ce_top1` is cross-entropy to the teacher's top-1; `kl_full` is KL(teacher || student) over the
  whole vocabulary, from the teacher's final hidden state (the online teacher only: shards hold the top-K),
  whose logits are recomputed chunk by chunk beside the student's. It runs over chunks of tokens and computes
  each chunk's input gradient in closed form while the chunk's logits exist (about two `[chunk, V]` fp32
  buffers), so neither forward nor backward ever holds `[N, V]` logits: backward only scales the stored
  `[N, d]` gradient, and needs no lm_head weight (no recompute, no gather under ZeRO-3).
  `token_regularizer_dense` is the same loss through autograd on materialised logits (the reference).
- Metrics (`char_metrics`): cheap `no_grad` 0-dim tensors, see the function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spellm_ds.errors import SpellmError

SELECTION_RULES = ("lowest", "teacher_prior")
REGULARIZERS = ("kl6", "ce_top1", "kl_full", "none")
# Regularizers that need the teacher's full distribution (its final hidden state), i.e. the online teacher.
NEEDS_TEACHER_LOGITS = ("kl_full",)
# Teacher log-probs below this are treated as probability 0 (fp16 shards can hold -inf).
_MIN_LOGPROB = -1.0e4


@dataclass
class CharLoss:
    """Result of `char_selection_loss` (per-position tensors are flattened to N)."""

    loss: Tensor  # scalar: mean selected-candidate char loss over valid positions (0 when none)
    scores: Tensor  # Float[N, K] char loss of every candidate (detached)
    selected: Tensor  # Long[N] index into K of the selected candidate (0 where not valid)
    selected_ids: Tensor  # Long[N] token id of the selected candidate, -1 where not valid
    labels: Tensor  # Long[N, k] char row of the selected candidate (END row where not valid)
    cand_chars: Tensor  # Long[N, K, k] char rows of all candidates
    eligible: Tensor  # Bool[N, K] candidate can be a label (decodable, inside the table)
    valid: Tensor  # Bool[N] loss mask set and at least one eligible candidate
    mask: Tensor  # Bool[N] the loss mask as given
    n_no_candidate: Tensor  # Long scalar: masked-in positions with no eligible candidate


@dataclass
class RegularizerOut:
    """Result of `token_regularizer`."""

    loss: Tensor  # scalar: mean per-position regularizer over masked-in positions (0 when none/disabled)
    fallback_top1: Tensor  # scalar: share of masked-in positions where lm_head argmax == teacher top-1
    n_positions: Tensor  # Long scalar: masked-in positions


def _unknown(what: str, value: str, known: tuple[str, ...]) -> SpellmError:
    """The error for a rule name outside `known` (the run config has already refused such a value)."""
    return SpellmError(f"unknown {what} {value!r} (one of {', '.join(known)})")


def candidate_chars(topk_ids: Tensor, token_chars: Tensor, eligible: Tensor) -> tuple[Tensor, Tensor]:
    """Char rows Long[..., K, k] of candidates and eligibility Bool[..., K] (ids outside the table: no)."""
    vocab = token_chars.shape[0]
    inside = (topk_ids >= 0) & (topk_ids < vocab)
    safe = topk_ids.clamp(0, vocab - 1).long()
    return token_chars[safe].long(), eligible[safe] & inside


def candidate_scores(char_logits: Tensor, cand_chars: Tensor) -> Tensor:
    """Sum over heads of per-head CE, Float[N, K], of candidates Long[N, K, k] under logits [N, k, C]."""
    n, k, c = char_logits.shape
    kk = cand_chars.shape[1]
    logp = torch.log_softmax(char_logits.float(), dim=-1).reshape(n, k * c)
    # Flat index h*C + char picks head h's log-prob of the candidate's h-th char without expanding [N,K,k,C].
    offsets = torch.arange(k, device=char_logits.device) * c
    flat = (cand_chars + offsets).reshape(n, kk * k)
    return -logp.gather(1, flat).reshape(n, kk, k).sum(-1)


@torch.no_grad()
def select_candidates(
    scores: Tensor, eligible: Tensor, topk_logprobs: Tensor, selection: str = "lowest", tau: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Index Long[N] of the selected candidate and Bool[N] whether any candidate was eligible."""
    key = scores.detach().float()
    if selection == "teacher_prior":
        key = key - tau * topk_logprobs.float().clamp(min=_MIN_LOGPROB)
    elif selection != "lowest":
        raise _unknown("selection", selection, SELECTION_RULES)
    key = key.masked_fill(~eligible, float("inf"))
    # Among equal keys take the teacher's most likely candidate (independent of the candidates' order).
    tied = key == key.min(-1, keepdim=True).values
    prior = topk_logprobs.float().clamp(min=_MIN_LOGPROB).masked_fill(~tied, float("-inf"))
    return prior.argmax(-1), eligible.any(-1)


def char_selection_loss(
    char_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    loss_mask: Tensor,
    token_chars: Tensor,
    eligible: Tensor,
    *,
    selection: str = "lowest",
    tau: float = 1.0,
) -> CharLoss:
    """Char loss of the selected teacher candidate per position (see the module docstring)."""
    if selection not in SELECTION_RULES:
        raise _unknown("selection", selection, SELECTION_RULES)
    k, c = char_logits.shape[-2:]
    logits = char_logits.reshape(-1, k, c)
    kk = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1, kk)
    lps = topk_logprobs.reshape(-1, kk)
    mask = loss_mask.reshape(-1).bool()
    if token_chars.shape[1] != k:
        raise SpellmError(f"char table has k={token_chars.shape[1]} but the model has {k} char heads")
    chars, ok = candidate_chars(ids, token_chars, eligible)
    scores = candidate_scores(logits, chars)
    sel, has = select_candidates(scores, ok, lps, selection, tau)
    valid = mask & has
    picked = scores.gather(1, sel[:, None]).squeeze(1)
    loss = torch.where(valid, picked, torch.zeros_like(picked)).sum() / valid.sum().clamp(min=1)
    sel = torch.where(valid, sel, torch.zeros_like(sel))
    labels = chars.gather(1, sel[:, None, None].expand(-1, 1, k)).squeeze(1)
    labels = torch.where(valid[:, None], labels, torch.zeros_like(labels))
    sel_ids = torch.where(valid, ids.gather(1, sel[:, None]).squeeze(1).long(), torch.full_like(sel, -1))
    return CharLoss(
        loss=loss,
        scores=scores.detach(),
        selected=sel,
        selected_ids=sel_ids,
        labels=labels,
        cand_chars=chars,
        eligible=ok,
        valid=valid,
        mask=mask,
        n_no_candidate=(mask & ~has).sum(),
    )


def regularizer_rows(
    logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, kind: str, teacher_logits: Tensor | None = None
) -> Tensor:
    """Per-position regularizer Float[c] from full-vocabulary logits [c, V] (candidate ids distinct)."""
    z = logits.float()
    if kind == "kl_full":
        if teacher_logits is None:
            raise SpellmError("loss.regularizer=kl_full needs the teacher's logits")
        log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
        return (log_p.exp() * (log_p - torch.log_softmax(z, dim=-1))).sum(-1)
    lse = torch.logsumexp(z, dim=-1)
    lps = topk_logprobs.float().clamp(min=_MIN_LOGPROB)
    ids = topk_ids.long()
    if kind == "ce_top1":
        top1 = ids.gather(1, lps.argmax(-1, keepdim=True))
        return lse - z.gather(1, top1).squeeze(1)
    if kind != "kl6":
        raise _unknown("regularizer with a per-position value", kind, ("kl6", "ce_top1", "kl_full"))
    s = z.gather(1, ids) - lse[:, None]  # student full-vocab log-probs of the candidates
    in_cand = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    # Student rest mass as a masked logsumexp: stable even when the candidates hold almost all mass.
    log_rest_s = torch.logsumexp(z.masked_fill(in_cand, float("-inf")), dim=-1) - lse
    p = lps.exp()
    rest_t = (1.0 - p.sum(-1)).clamp(min=0.0)
    return (p * (lps - s)).sum(-1) + torch.xlogy(rest_t, rest_t) - rest_t * log_rest_s


def _sanitize(
    topk_ids: Tensor, topk_logprobs: Tensor, loss_mask: Tensor, vocab: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten, and make masked-out rows harmless (distinct in-range ids, finite log-probs)."""
    kk = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1, kk).long()
    lps = topk_logprobs.reshape(-1, kk).float()
    mask = loss_mask.reshape(-1).bool()
    filler = torch.arange(kk, device=ids.device).expand_as(ids)
    ids = torch.where(mask[:, None], ids.clamp(0, vocab - 1), filler)
    lps = torch.where(mask[:, None], lps, torch.full_like(lps, -10.0))
    return ids, lps, mask


def token_regularizer_dense(
    hidden: Tensor,
    weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    loss_mask: Tensor,
    kind: str = "kl6",
    teacher_hidden: Tensor | None = None,
) -> RegularizerOut:
    """Unchunked regularizer (materialises [N, V] logits): the reference for `token_regularizer`."""
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    ids, lps, mask = _sanitize(topk_ids, topk_logprobs, loss_mask, weight.shape[0])
    logits = h @ weight.t()
    teacher = teacher_hidden.reshape(-1, d) @ weight.t() if teacher_hidden is not None else None
    rows = regularizer_rows(logits, ids, lps, kind, teacher)
    n = mask.sum()
    loss = torch.where(mask, rows, torch.zeros_like(rows)).sum() / n.clamp(min=1)
    with torch.no_grad():
        top1 = ids.gather(1, lps.argmax(-1, keepdim=True)).squeeze(1)
        agree = ((logits.argmax(-1) == top1) & mask).sum().float() / n.clamp(min=1)
    return RegularizerOut(loss=loss, fallback_top1=agree, n_positions=n)


def _rows_and_grad(
    logits: Tensor, ids: Tensor, lps: Tensor, mask: Tensor, kind: str, teacher_logits: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Masked per-position regularizer Float[c] and its gradient Float[c, V] w.r.t. the logits (in place).

    Closed form, so a chunk needs about two [c, V] buffers (the logits, reused for the softmax and then
    the gradient, plus logsumexp's temporary) instead of an autograd graph. With q = softmax(z),
    P = sum of teacher candidate probs, r_t = max(0, 1 - P) and r_s = student mass outside the candidates:
    kl6 is sum_i p_i (lp_i - log q_i) + r_t (log r_t - log r_s), whose gradient is
    q_j (P + r_t - r_t / r_s) outside the candidates and q_j (P + r_t) - p_j on them;
    ce_top1 is -log q_top1 with gradient q - onehot(top1); kl_full, with p = softmax(teacher logits t), is
    sum_j p_j log p_j - sum_j p_j z_j + logsumexp(z) (since sum p = 1), with gradient q - p.
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    w = mask.float()[:, None]
    if kind == "kl_full":
        log_p = teacher_logits.float()
        log_p = log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))  # in the teacher buffer
        p = log_p.exp()
        rows = (p * log_p).sum(-1) - (p * z).sum(-1) + lse.squeeze(1)
        grad = z.sub_(lse).exp_().sub_(p).mul_(w)
        return torch.where(mask, rows, torch.zeros_like(rows)), grad
    if kind == "ce_top1":
        top1 = ids.gather(1, lps.argmax(-1, keepdim=True))
        rows = (lse - z.gather(1, top1)).squeeze(1)
        grad = z.sub_(lse).exp_().mul_(w).scatter_add_(1, top1, -w)  # softmax in the logits buffer
        return torch.where(mask, rows, torch.zeros_like(rows)), grad
    log_qc = z.gather(1, ids) - lse  # exact even where q_c underflows
    q = z.sub_(lse).exp_()  # softmax, in the logits buffer
    qc = log_qc.exp()
    p = lps.exp()
    big_p = p.sum(-1, keepdim=True)
    rest_t = (1.0 - big_p).clamp(min=0.0)
    rest_s = q.scatter_(1, ids, 0.0).sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    rows = (p * (lps - log_qc)).sum(-1) + (torch.xlogy(rest_t, rest_t) - rest_t * rest_s.log()).squeeze(1)
    grad = q.mul_(w * (big_p + rest_t - rest_t / rest_s))
    grad.scatter_(1, ids, w * (qc * (big_p + rest_t) - p))
    return torch.where(mask, rows, torch.zeros_like(rows)), grad


class _ChunkedRegularizer(torch.autograd.Function):
    """Sum of per-position regularizer over masked-in rows, chunked; the input gradient is made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, lps, mask, kind, chunk, grad_enabled, teacher):
        want_h = grad_enabled and hidden.requires_grad and kind != "none"
        want_w = grad_enabled and weight.requires_grad and kind != "none"
        ctx.weight_dtype = weight.dtype
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        agree = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        top1 = ids.gather(1, lps.argmax(-1, keepdim=True)).squeeze(1)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h, m = hidden[s:e], mask[s:e]
            logits = h @ weight.t()
            agree += ((logits.argmax(-1) == top1[s:e]) & m).sum()
            if kind == "none":
                continue
            t_logits = teacher[s:e] @ weight.t() if teacher is not None else None
            rows, gz = _rows_and_grad(logits, ids[s:e], lps[s:e], m, kind, t_logits)
            total += rows.sum()
            if want_h or want_w:
                gz = gz.to(weight.dtype)
                if want_h:
                    grad_h[s:e] = gz @ weight
                if want_w:
                    grad_w += (gz.t() @ h).float()
            del logits, gz, t_logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(agree)
        return total, agree

    @staticmethod
    def backward(ctx, g_total, _g_agree):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * g_total.to(grad_h.dtype)) if grad_h is not None else None
        gw = (grad_w * g_total).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None


def token_regularizer(
    hidden: Tensor,
    weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    loss_mask: Tensor,
    kind: str = "kl6",
    chunk: int = 64,
    teacher_hidden: Tensor | None = None,
) -> RegularizerOut:
    """Regularizer of the frozen head `weight` [V, d] on `hidden` [..., d], chunked over tokens.

    `kind="none"` computes only `fallback_top1` (no loss, no gradient). `kl_full` needs the teacher's
    final hidden state `teacher_hidden` (shaped like `hidden`, no gradient).
    """
    if kind not in REGULARIZERS:
        raise _unknown("regularizer", kind, REGULARIZERS)
    if chunk < 1:
        raise SpellmError(f"reg_chunk must be >= 1, got {chunk}")
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    if kind in NEEDS_TEACHER_LOGITS and teacher_hidden is None:
        raise SpellmError(f"loss.regularizer={kind} needs the teacher's hidden state (the online teacher)")
    teacher = None
    if kind in NEEDS_TEACHER_LOGITS:
        teacher = teacher_hidden.detach().reshape(-1, d).to(h.dtype)
    ids, lps, mask = _sanitize(topk_ids, topk_logprobs, loss_mask, weight.shape[0])
    total, agree = _ChunkedRegularizer.apply(
        h, weight, ids, lps, mask, kind, chunk, torch.is_grad_enabled(), teacher
    )
    n = mask.sum()
    return RegularizerOut(loss=total / n.clamp(min=1), fallback_top1=agree / n.clamp(min=1), n_positions=n)


def string_matches(
    pred: Tensor, cand: Tensor, cand_long: Tensor | None = None, end_id: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact, truncation-prefix and any-prefix flags of END-padded char rows `pred` vs `cand` [..., k].

    `exact`: the rows are equal. `truncation_prefix` (the strict prefix): `pred` has all k symbols (no END)
    and equals the row of a candidate spelled longer than k (`cand_long`, broadcast like the rows without
    their last dim; None means no candidate is longer), i.e. its first k characters: the only prefix the k
    heads can be asked for. `any_prefix` (lenient, never a headline): `pred` up to its first END is
    non-empty and starts the candidate's string, so one common character matches most candidates.
    """
    k = pred.shape[-1]
    same = pred == cand
    exact = same.all(-1)
    is_end = pred == end_id
    # Length of the predicted string: index of its first END (k when it has none).
    plen = torch.where(is_end.any(-1), is_end.long().argmax(-1), torch.full_like(pred[..., 0], k))
    before = torch.arange(k, device=pred.device) < plen[..., None]
    any_prefix = (same | ~before).all(-1) & (plen > 0)
    if cand_long is None:
        truncation = torch.zeros_like(exact)
    else:
        truncation = exact & (plen == k) & cand_long
    return exact, truncation, any_prefix


@torch.no_grad()
def char_metrics(
    char_logits: Tensor, out: CharLoss, topk_logprobs: Tensor, end_id: int = 0
) -> dict[str, Tensor]:
    """Per-step metrics (0-dim tensors) of the char heads against the selected label, top-K and teacher top-1.

    Over valid positions: `char_acc` (mean over heads) and `char_acc_h{i}`; `exact_*` (all k chars equal:
    in char space this is the strict exact-or-prefix, since a candidate longer than k has its first k
    characters as its row) and `any_prefix_*` (lenient: the argmax string up to its first END is non-empty
    and starts the candidate's string) against the selected label (`_selected`), any eligible candidate
    (`_top5`) and the teacher's top-1 if eligible (`_top1`); `head_entropy` (nats, mean over heads);
    `label_not_top1` (share of labels that are not the teacher's top-1). Counts: `n_positions` (loss mask),
    `n_valid`, `n_no_candidate`.
    """
    k, c = char_logits.shape[-2:]
    logits = char_logits.reshape(-1, k, c).float()
    valid = out.valid
    nv = valid.sum()
    denom = nv.clamp(min=1).float()
    pred = logits.argmax(-1)  # [N, k]
    heads_ok = (pred == out.labels) & valid[:, None]
    per_head = heads_ok.sum(0).float() / denom
    metrics: dict[str, Tensor] = {"char_acc": per_head.mean()}
    for i in range(k):
        metrics[f"char_acc_h{i}"] = per_head[i]
    ex, _, pf = string_matches(pred, out.labels, end_id=end_id)
    metrics["exact_selected"] = (ex & valid).sum() / denom
    metrics["any_prefix_selected"] = (pf & valid).sum() / denom
    ex5, _, pf5 = string_matches(pred[:, None, :], out.cand_chars, end_id=end_id)
    metrics["exact_top5"] = ((ex5 & out.eligible).any(-1) & valid).sum() / denom
    metrics["any_prefix_top5"] = ((pf5 & out.eligible).any(-1) & valid).sum() / denom
    kk = out.cand_chars.shape[1]
    top = topk_logprobs.reshape(-1, kk).float().argmax(-1, keepdim=True)
    top_ok = out.eligible.gather(1, top).squeeze(1)
    ex1 = ex5.gather(1, top).squeeze(1) & top_ok
    pf1 = pf5.gather(1, top).squeeze(1) & top_ok
    metrics["exact_top1"] = (ex1 & valid).sum() / denom
    metrics["any_prefix_top1"] = (pf1 & valid).sum() / denom
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1).mean(-1)  # [N]
    metrics["head_entropy"] = torch.where(valid, ent, torch.zeros_like(ent)).sum() / denom
    metrics["label_not_top1"] = ((out.selected != top.squeeze(1)) & valid).sum() / denom
    metrics["n_positions"] = out.mask.sum()
    metrics["n_valid"] = nv
    metrics["n_no_candidate"] = out.n_no_candidate
    return metrics
