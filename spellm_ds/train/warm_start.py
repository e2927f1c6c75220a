"""Warm start of the char heads: a softmax fit on the untouched model's final hidden states, before step 0.

At step 0 the student is the teacher, so its final normed hidden state h at each position is the
teacher's. Each char head i is an independent linear softmax over the |C| symbols, and the label it
would be trained on first is known without training: with zero heads every candidate scores the same,
so the selection rule (either one) picks the teacher's most likely eligible candidate, and head i's
target is symbol i of that candidate's row. Fitting W_i [|C|, d] to those targets is a convex problem
(mean cross-entropy plus (l2/2)·|W_i|²) on a fixed feature matrix, solved here with L-BFGS in seconds,
where training from zero spends its first hundreds of steps learning the same map through the whole
model. The MLPs then start with heads that already spell, so their first gradients carry signal.

`fit_head` and `selected_rows` are pure tensor functions. `warm_start_heads` is the collective part:
every rank runs the same number of no-grad forwards on its share of the first training samples, the
features and labels are all-gathered, rank r fits heads r, r+W, ..., the fitted rows are all-gathered
again, and rank 0 writes them into the (ZeRO-3 partitioned) head weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from spellm_ds.errors import SpellmError
from spellm_ds.train import losses


def selected_rows(
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    loss_mask: Tensor,
    token_chars: Tensor,
    eligible: Tensor,
    num_chars: int,
) -> tuple[Tensor, Tensor]:
    """Char rows Long[N, k] the selection rule picks when every head is uniform, and Bool[N] valid."""
    n = topk_ids.reshape(-1, topk_ids.shape[-1]).shape[0]
    uniform = torch.zeros(n, token_chars.shape[1], num_chars, device=topk_ids.device)
    out = losses.char_selection_loss(
        uniform, topk_ids, topk_logprobs, loss_mask, token_chars, eligible, selection="lowest"
    )
    return out.labels, out.valid


def fit_head(x: Tensor, y: Tensor, num_chars: int, iters: int = 60, l2: float = 1e-4) -> Tensor:
    """Weights [num_chars, d] of a softmax classifier of labels `y` [n] from features `x` [n, d].

    Solved in float32, or in float64 when `x` is float64.
    """
    x = x if x.dtype == torch.float64 else x.float()
    w = torch.zeros(num_chars, x.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def head_objective(x: Tensor, y: Tensor, w: Tensor, l2: float) -> float:
    """The fitted objective: mean cross-entropy of `x @ w.T` against `y` plus (l2/2)·|w|²."""
    logits = x.double() @ w.double().T
    return float(torch.nn.functional.cross_entropy(logits, y) + 0.5 * l2 * (w.double() ** 2).sum())


def _all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0 (rank order)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def warm_start_heads(
    engine: Any,
    model: Any,
    batches: Iterable[dict[str, Tensor]],
    *,
    iters: int,
    l2: float,
    online: bool = False,
) -> dict[str, float]:
    """Collective: fit every char head on the batches' final hidden states and write the weights.

    `engine` runs the forward (a DeepSpeed engine, or the model itself); every rank must pass the same
    number of batches. `online`: the labels come from the model's online teacher, not the batches.
    Returns the fit's figures: positions, and mean per-head accuracy and cross-entropy on the fitted
    positions before (zero heads: ln|C|) and after.
    """
    import torch.distributed as dist

    feats, labels, valid = [], [], []
    for batch in batches:
        out = engine(input_ids=batch["input_ids"], online_teacher=online)
        feats.append(out.hidden.reshape(-1, out.hidden.shape[-1]).float())
        device = feats[-1].device
        rows, ok = selected_rows(
            out.teacher_topk_ids if online else batch["topk_ids"],
            out.teacher_topk_logprobs if online else batch["topk_logprobs"],
            batch["loss_mask"],
            model.token_chars.to(device),
            model.eligible.to(device),
            model.num_chars,
        )
        labels.append(rows)
        valid.append(ok)
    if not feats:
        raise SpellmError("warm start: the training shards gave no batch to fit the char heads on")
    x = _all_gather_cat(torch.cat(feats))
    y = _all_gather_cat(torch.cat(labels))
    ok = _all_gather_cat(torch.cat(valid).to(torch.uint8)).bool()  # uint8: every backend gathers it
    x, y = x[ok], y[ok]
    k, c = model.k, model.num_chars
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    weight = torch.zeros(k, c, x.shape[1], dtype=torch.float32, device=x.device)
    for i in range(rank, k, world):
        weight[i] = fit_head(x, y[:, i], c, iters, l2).float()
    if world > 1:
        dist.all_reduce(weight)  # each head was fitted on exactly one rank; the others hold zeros
    logits = torch.einsum("nd,kcd->nkc", x, weight)
    acc = float((logits.argmax(-1) == y).float().mean()) if len(y) else 0.0
    ce = float(torch.nn.functional.cross_entropy(logits.reshape(-1, c), y.reshape(-1))) if len(y) else 0.0
    model.set_char_heads(weight.reshape(k * c, -1))
    return {"positions": float(len(y)), "char_acc": acc, "char_ce": ce, "char_ce_zero": float(math.log(c))}
