"""Char selection loss, token regularizer and metrics against plain per-position reference code.

The references loop over positions in Python and use torch.nn.functional on single rows (float64 for
the regularizer), so they share no code with `spellm_ds.train.losses`. Values and gradients are compared.
Run alone: `.venv/bin/python -m pytest tests/test_losses.py -q`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spellm_ds.errors import SpellmError
from spellm_ds.train import losses

K = 5


def _table(vocab: int, k: int, c: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random END-padded char rows (lengths 1..k) and a random eligibility mask."""
    chars = torch.randint(1, c, (vocab, k), generator=gen)
    lengths = torch.randint(1, k + 1, (vocab,), generator=gen)
    chars[torch.arange(k)[None, :] >= lengths[:, None]] = 0
    eligible = torch.rand(vocab, generator=gen) > 0.25
    return chars, eligible


def _teacher(n: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct top-K ids per position and sorted full-vocab-style log-probs (rest mass > 0)."""
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:K] for _ in range(n)])
    probs = torch.rand(n, K + 1, generator=gen).softmax(-1)[:, :K]
    lps = probs.log().sort(-1, descending=True).values
    return ids, lps


def _ref_char_loss(logits, ids, lps, mask, table, eligible, selection, tau):
    """Loop reference: (loss, selected ids, n_no_candidate)."""
    total, count, no_cand, picked = 0.0, 0, 0, []
    vocab = table.shape[0]
    for n in range(logits.shape[0]):
        if not mask[n]:
            picked.append(-1)
            continue
        best = None
        for j in range(ids.shape[1]):
            tok = int(ids[n, j])
            if not (0 <= tok < vocab) or not eligible[tok]:
                continue
            score = sum(
                F.cross_entropy(logits[n, h][None].float(), table[tok, h][None])
                for h in range(logits.shape[1])
            )
            key = float(score.detach()) - (tau * float(lps[n, j]) if selection == "teacher_prior" else 0.0)
            cand = (key, -float(lps[n, j]), score, tok)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None:
            no_cand += 1
            picked.append(-1)
            continue
        total = total + best[2]
        count += 1
        picked.append(best[3])
    loss = total / count if count else torch.zeros(())
    return loss, picked, no_cand


@pytest.mark.parametrize(
    ("selection", "tau"), [("lowest", 1.0), ("teacher_prior", 0.7), ("teacher_prior", 5.0)]
)
def test_char_loss_matches_reference(selection, tau):
    gen = torch.Generator().manual_seed(1)
    vocab, k, c, b, t = 50, 4, 7, 2, 9
    table, eligible = _table(vocab, k, c, gen)
    ids, lps = _teacher(b * t, vocab, gen)
    ids, lps = ids.view(b, t, K), lps.view(b, t, K)
    mask = torch.rand(b, t, generator=gen) > 0.2
    # One position with no eligible candidate, one with an out-of-table id, one exact tie (zero logits).
    eligible[ids[0, 1]] = False
    mask[0, 1] = True
    ids[1, 2, 3] = vocab + 3
    logits = torch.randn(b, t, k, c, generator=gen)
    logits[1, 4] = 0.0
    mask[1, 4] = True
    logits.requires_grad_(True)
    out = losses.char_selection_loss(logits, ids, lps, mask, table, eligible, selection=selection, tau=tau)
    out.loss.backward()
    got_grad = logits.grad.clone()

    ref_logits = logits.detach().clone().requires_grad_(True)
    flat = ref_logits.view(b * t, k, c)
    ref_loss, ref_ids, ref_none = _ref_char_loss(
        flat, ids.view(-1, K), lps.view(-1, K), mask.view(-1), table, eligible, selection, tau
    )
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert out.selected_ids.tolist() == ref_ids
    assert int(out.n_no_candidate) == ref_none >= 1
    # The tie at (1, 4) goes to the teacher's most likely eligible candidate.
    tie = 1 * t + 4
    elig_ids = [int(i) for i in ids[1, 4] if int(i) < vocab and eligible[int(i)]]
    if selection == "lowest" and elig_ids:
        assert int(out.selected_ids[tie]) == elig_ids[0]
    for n, tok in enumerate(ref_ids):
        expect = table[tok] if tok >= 0 else torch.zeros(k, dtype=torch.long)
        assert out.labels[n].tolist() == expect.tolist()


def test_char_loss_all_masked_is_zero_with_zero_grad():
    gen = torch.Generator().manual_seed(2)
    table, eligible = _table(20, 3, 5, gen)
    ids, lps = _teacher(4, 20, gen)
    logits = torch.randn(4, 3, 5, requires_grad=True)
    out = losses.char_selection_loss(logits, ids, lps, torch.zeros(4, dtype=torch.bool), table, eligible)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and int(out.n_no_candidate) == 0
    assert torch.count_nonzero(logits.grad) == 0
    assert out.selected_ids.tolist() == [-1] * 4


def test_bad_rules_raise():
    t = torch.zeros(3, 2, dtype=torch.long)
    ids, lps, one = torch.zeros(1, K, dtype=torch.long), torch.zeros(1, K), torch.ones(1).bool()
    with pytest.raises(SpellmError, match="selection"):
        losses.char_selection_loss(
            torch.zeros(1, 2, 3), ids, lps, one, t, torch.ones(3).bool(), selection="best"
        )
    with pytest.raises(SpellmError, match="regularizer"):
        losses.token_regularizer(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, K).long(),
                                 torch.zeros(1, K), torch.ones(1).bool(), kind="kl5")  # fmt: skip
    with pytest.raises(SpellmError, match="reg_chunk"):
        losses.token_regularizer(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, K).long(),
                                 torch.zeros(1, K), torch.ones(1).bool(), kind="kl6", chunk=0)  # fmt: skip


def _ref_regularizer(hidden, weight, ids, lps, mask, kind):
    """Float64 loop reference of the regularizer (mean over masked-in rows) and lm_head top-1 agreement."""
    total, count, agree = 0.0, 0, 0
    for n in range(hidden.shape[0]):
        if not mask[n]:
            continue
        logp = F.log_softmax(hidden[n] @ weight.t(), dim=-1)
        top1 = int(ids[n, int(lps[n].argmax())])
        agree += int(int(logp.argmax()) == top1)
        if kind == "ce_top1":
            row = F.nll_loss(logp[None], torch.tensor([top1]))
        else:
            p = lps[n].exp()
            q = logp[ids[n]].exp()
            rest_t, rest_s = 1.0 - p.sum(), 1.0 - q.sum()
            row = (p * (p.log() - q.log())).sum() + rest_t * (rest_t.log() - rest_s.log())
        total = total + row
        count += 1
    return total / count, agree / count


@pytest.mark.parametrize("kind", ["kl6", "ce_top1"])
def test_regularizer_matches_reference(kind):
    gen = torch.Generator().manual_seed(3)
    n, d, vocab = 13, 8, 40
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) * 0.7
    ids, lps = _teacher(n, vocab, gen)
    mask = torch.rand(n, generator=gen) > 0.3
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = losses.token_regularizer(h, w, ids, lps, mask, kind=kind, chunk=4)
    out.loss.backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref, agree = _ref_regularizer(h64, w64, ids, lps.double(), mask, kind)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert float(out.fallback_top1) == pytest.approx(agree)
    assert int(out.n_positions) == int(mask.sum())


def test_kl6_is_zero_when_student_equals_teacher():
    """A student whose full-vocab distribution is the teacher's has KL 0 (rest bucket included)."""
    gen = torch.Generator().manual_seed(4)
    vocab = 30
    logits = torch.randn(3, vocab, generator=gen)
    logp = logits.log_softmax(-1)
    top = logp.topk(K, dim=-1)
    rows = losses.regularizer_rows(logits, top.indices, top.values, "kl6")
    torch.testing.assert_close(rows, torch.zeros(3), atol=1e-6, rtol=0)
    # Renormalising over the K ids alone would miss this: shift mass from the rest into a candidate.
    shifted = logits.clone()
    shifted[0, top.indices[0, 0]] += 2.0
    assert float(losses.regularizer_rows(shifted, top.indices, top.values, "kl6")[0]) > 1e-3


@pytest.mark.parametrize("kind", ["kl6", "ce_top1"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 32, 100])
def test_chunked_regularizer_equals_dense(kind, chunk):
    gen = torch.Generator().manual_seed(5)
    b, t, d, vocab = 2, 16, 12, 64
    hidden = torch.randn(b, t, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) * 0.5
    ids, lps = _teacher(b * t, vocab, gen)
    ids, lps = ids.view(b, t, K), lps.view(b, t, K)
    mask = torch.rand(b, t, generator=gen) > 0.2
    mask[0, 0] = False
    ids[0, 0] = 0  # garbage (repeated ids) on a masked-out position must not matter
    lps[0, 0] = float("-inf")
    res = {}
    for name, fn in (("chunked", losses.token_regularizer), ("dense", losses.token_regularizer_dense)):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        kwargs = {"chunk": chunk} if name == "chunked" else {}
        out = fn(h, w, ids, lps, mask, kind=kind, **kwargs)
        (2.5 * out.loss).backward()
        res[name] = (out.loss.detach(), h.grad, w.grad, out.fallback_top1)
    for a, b_ in zip(res["chunked"], res["dense"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


def test_regularizer_without_grad_and_kind_none():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(6, 4, generator=gen, requires_grad=True)
    weight = torch.randn(10, 4, generator=gen)
    ids, lps = _teacher(6, 10, gen)
    mask = torch.ones(6, dtype=torch.bool)
    dense = losses.token_regularizer_dense(hidden, weight, ids, lps, mask)
    with torch.no_grad():
        out = losses.token_regularizer(hidden, weight, ids, lps, mask, chunk=4)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, dense.loss.detach())
    none = losses.token_regularizer(hidden, weight, ids, lps, mask, kind="none", chunk=4)
    assert float(none.loss.detach()) == 0.0
    assert float(none.fallback_top1) == float(dense.fallback_top1)


def _string(row: list[int]) -> list[int]:
    return row[: row.index(0)] if 0 in row else row


def _ref_metrics(logits, out, ids, lps, table, eligible):
    """Loop reference of `char_metrics` over valid positions."""
    n_pos, k, _ = logits.shape
    acc = [0] * k
    counts = dict.fromkeys(
        [
            "exact_selected",
            "any_prefix_selected",
            "exact_top5",
            "any_prefix_top5",
            "exact_top1",
            "any_prefix_top1",
        ],
        0,
    )
    ent, not_top1, nv = 0.0, 0, 0
    for n in range(n_pos):
        if not out.valid[n]:
            continue
        nv += 1
        pred = [int(logits[n, h].argmax()) for h in range(k)]
        label = out.labels[n].tolist()
        for h in range(k):
            acc[h] += int(pred[h] == label[h])
        ps = _string(pred)

        def matches(cand: list[int], ps=ps, pred=pred) -> tuple[bool, bool]:
            cs = _string(cand)
            return pred == cand, len(ps) > 0 and cs[: len(ps)] == ps

        ex, pf = matches(label)
        counts["exact_selected"] += ex
        counts["any_prefix_selected"] += pf
        elig = [int(i) for i in ids[n] if eligible[int(i)]]
        counts["exact_top5"] += any(matches(table[i].tolist())[0] for i in elig)
        counts["any_prefix_top5"] += any(matches(table[i].tolist())[1] for i in elig)
        top1 = int(ids[n, int(lps[n].argmax())])
        if eligible[top1]:
            ex1, pf1 = matches(table[top1].tolist())
            counts["exact_top1"] += ex1
            counts["any_prefix_top1"] += pf1
        not_top1 += int(out.selected_ids[n]) != top1
        for h in range(k):
            p = F.softmax(logits[n, h].double(), -1)
            ent += float(-(p * p.log()).sum()) / k
    ref = {f"char_acc_h{h}": acc[h] / nv for h in range(k)}
    ref["char_acc"] = sum(acc) / (k * nv)
    ref.update({key: v / nv for key, v in counts.items()})
    ref["head_entropy"] = ent / nv
    ref["label_not_top1"] = not_top1 / nv
    ref["n_valid"] = nv
    return ref


def test_metrics_match_reference():
    gen = torch.Generator().manual_seed(7)
    # Few symbols and short rows so exact and prefix matches are frequent in random data.
    vocab, k, c, n = 12, 3, 3, 400
    table, eligible = _table(vocab, k, c, gen)
    eligible[:] = True
    eligible[torch.randperm(vocab, generator=gen)[:3]] = False
    ids, lps = _teacher(n, vocab, gen)
    mask = torch.rand(n, generator=gen) > 0.1
    logits = torch.randn(n, k, c, generator=gen) * 3
    out = losses.char_selection_loss(logits, ids, lps, mask, table, eligible, selection="lowest")
    got = losses.char_metrics(logits, out, lps)
    ref = _ref_metrics(logits, out, ids, lps, table, eligible)
    for key, value in ref.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert int(got["n_positions"]) == int(mask.sum())
    # The fixture must exercise every branch: matches of each kind and non-top-1 labels.
    for key in ("exact_selected", "any_prefix_selected", "exact_top5", "any_prefix_top1", "label_not_top1"):
        assert 0 < ref[key] < 1, key
    assert ref["any_prefix_selected"] > ref["exact_selected"]


def test_empty_prediction_is_not_a_prefix_match():
    table = torch.tensor([[0, 0], [1, 0], [1, 2]])
    eligible = torch.tensor([False, True, True])
    ids = torch.tensor([[1, 2, 0, 0, 0]])  # repeated filler ids are ineligible here
    lps = torch.tensor([[-0.1, -3.0, -9.0, -9.5, -9.9]])
    logits = torch.full((1, 2, 3), -5.0)
    logits[0, :, 0] = 5.0  # predicts END END: the empty string
    out = losses.char_selection_loss(logits, ids, lps, torch.ones(1, dtype=torch.bool), table, eligible)
    m = losses.char_metrics(logits, out, lps)
    assert float(m["any_prefix_selected"]) == 0.0 and float(m["any_prefix_top5"]) == 0.0
    logits[0, 0] = torch.tensor([-5.0, 5.0, -5.0])  # "1" + END: exact for token 1, prefix of token 2
    out = losses.char_selection_loss(logits, ids, lps, torch.ones(1, dtype=torch.bool), table, eligible)
    m = losses.char_metrics(logits, out, lps)
    assert int(out.selected_ids[0]) == 1
    assert float(m["exact_top1"]) == 1.0 and float(m["any_prefix_top5"]) == 1.0
    assert float(m["label_not_top1"]) == 0.0
    assert math.isclose(float(m["char_acc"]), 1.0)


def test_string_matches_strict_and_lenient_by_hand():
    # k = 3, symbols 1..4, END = 0. Candidates: [1, 2, 3] spelled longer than k (its first 3 chars),
    # [1, 2, 3] of exactly 3 chars, [1, 2, 0] ("12"), [4, 0, 0] ("4").
    cand = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 0], [4, 0, 0]])
    long = torch.tensor([True, False, False, False])
    no, yes = False, True
    preds = {  # prediction: exact, truncation prefix, any prefix (per candidate)
        "one char starting three": ([1, 0, 0], [no, no, no, no], [no, no, no, no], [yes, yes, yes, no]),
        "all k chars of a longer": ([1, 2, 3], [yes, yes, no, no], [yes, no, no, no], [yes, yes, no, no]),
        "two of k chars": ([1, 2, 0], [no, no, yes, no], [no, no, no, no], [yes, yes, yes, no]),
        "empty": ([0, 0, 0], [no, no, no, no], [no, no, no, no], [no, no, no, no]),
    }
    for what, (pred, want_exact, want_trunc, want_any) in preds.items():
        exact, trunc, anyp = losses.string_matches(torch.tensor(pred).expand(4, 3), cand, long)
        assert exact.tolist() == want_exact, what
        assert trunc.tolist() == want_trunc, what
        assert anyp.tolist() == want_any, what
    _, trunc, _ = losses.string_matches(torch.tensor([1, 2, 3]).expand(4, 3), cand)
    assert not trunc.any()  # no length information: no candidate is longer than k


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_kl_full_chunked_matches_float64_autograd_kl(chunk):
    """kl_full = KL(teacher || student) over the whole vocabulary; the teacher side gets no gradient."""
    gen = torch.Generator().manual_seed(8)
    n, d, vocab = 11, 8, 48
    hidden = torch.randn(n, d, generator=gen)
    teacher_hidden = hidden + 0.3 * torch.randn(n, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) * 0.6
    ids, lps = _teacher(n, vocab, gen)
    mask = torch.rand(n, generator=gen) > 0.3
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = losses.token_regularizer(
        h, w, ids, lps, mask, kind="kl_full", chunk=chunk, teacher_hidden=teacher_hidden
    )
    (3.0 * out.loss).backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    log_q = torch.log_softmax(h64 @ w64.t(), -1)
    log_p = torch.log_softmax(teacher_hidden.double() @ weight.double().t(), -1)
    rows = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    ref = rows[mask].mean()
    (3.0 * ref).backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    dense = losses.token_regularizer_dense(hidden, weight, ids, lps, mask, "kl_full", teacher_hidden)
    torch.testing.assert_close(dense.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    same = losses.token_regularizer(hidden, weight, ids, lps, mask, "kl_full", chunk, teacher_hidden=hidden)
    assert abs(float(same.loss)) < 1e-5  # the student equal to the teacher: KL 0
    with pytest.raises(SpellmError, match="kl_full needs the teacher"):
        losses.token_regularizer(hidden, weight, ids, lps, mask, "kl_full", chunk)
