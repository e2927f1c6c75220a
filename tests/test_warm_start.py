"""Warm start of the char heads (spellm_ds/train/warm_start.py) as pure functions: the label each head
is fitted to (the selection rule's pick under uniform heads, by hand) and the softmax fit (first-order
optimality checked by autograd on the objective, and a single-process write into a real model's heads).
The 2-rank run with a warm start is in tests/test_train.py.

Run alone: `.venv/bin/python -m pytest tests/test_warm_start.py -q`
"""

from __future__ import annotations

import math

import pytest
import torch

from spellm_ds.model.student import build_spellm_model
from spellm_ds.train.warm_start import fit_head, head_objective, selected_rows, warm_start_heads


def test_selected_rows_pick_the_most_likely_eligible_candidate():
    token_chars = torch.tensor([[1, 0], [2, 3], [3, 0], [4, 4]])
    eligible = torch.tensor([True, False, True, True])
    ids = torch.tensor([[1, 2, 0, 3, 0], [0, 3, 2, 1, 1], [1, 1, 1, 1, 1]])
    lps = torch.tensor([[-0.1, -2.0, -3.0, -4.0, -5.0]] * 3)
    mask = torch.tensor([True, True, True])
    rows, valid = selected_rows(ids, lps, mask, token_chars, eligible, num_chars=5)
    # row 0: id 1 is not eligible, the next most likely is id 2; row 1: id 0; row 2: nothing eligible
    assert valid.tolist() == [True, True, False]
    assert rows[:2].tolist() == [[3, 0], [1, 0]]


def test_fit_head_reaches_a_stationary_point_and_separates():
    gen = torch.Generator().manual_seed(3)
    n, d, c = 600, 12, 7
    centers = torch.randn(c, d, generator=gen) * 3
    y = torch.randint(0, c, (n,), generator=gen)
    x = centers[y] + torch.randn(n, d, generator=gen)
    l2 = 1e-3
    w = fit_head(x.double(), y, c, iters=200, l2=l2)
    # The objective is strictly convex with l2 > 0: its gradient vanishes only at the optimum.
    wg = w.clone().requires_grad_(True)
    obj = torch.nn.functional.cross_entropy(x.double() @ wg.T, y) + 0.5 * l2 * (wg * wg).sum()
    (grad,) = torch.autograd.grad(obj, wg)
    assert float(grad.abs().max()) < 1e-4
    assert head_objective(x, y, w, l2) == pytest.approx(float(obj.detach()))
    assert head_objective(x, y, torch.zeros_like(w), l2) == pytest.approx(math.log(c))
    assert float(((x.double() @ w.T).argmax(-1) == y).double().mean()) > 0.95


def test_warm_start_writes_fitted_heads_single_process(tiny_llama):
    model = build_spellm_model(tiny_llama, k=3, num_chars=6, trainable_layers=1)
    gen = torch.Generator().manual_seed(0)
    vocab = model.lm_head.weight.shape[0]
    token_chars = torch.randint(1, 6, (vocab, 3), generator=gen)
    model.token_chars, model.eligible = token_chars, torch.ones(vocab, dtype=torch.bool)
    ids = torch.randint(0, vocab, (4, 16), generator=gen)
    with torch.no_grad():
        logp = model.base(ids).logits.log_softmax(-1)
    top = logp.topk(5, -1)
    batch = {
        "input_ids": ids,
        "topk_ids": top.indices,
        "topk_logprobs": top.values,
        "loss_mask": torch.ones(4, 16, dtype=torch.bool),
    }
    fit = warm_start_heads(model, model, [batch], iters=50, l2=1e-4)
    assert fit["positions"] == 64 and fit["char_ce"] < fit["char_ce_zero"] == pytest.approx(math.log(6))
    # The written heads reproduce the fit's accuracy on the same positions.
    with torch.no_grad():
        logits = model(ids).char_logits.reshape(-1, 3, 6)
    want = token_chars[top.indices[..., 0].reshape(-1)]
    assert float((logits.argmax(-1) == want).float().mean()) == pytest.approx(fit["char_acc"])
