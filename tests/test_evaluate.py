"""Evaluation: metric functions on hand-built cases against hand-computed values (AUROC with ties, the
threshold sweep and calibration, exact/prefix matching, length and entropy buckets), then `spellm-ds eval`
end to end on real shards of a tiny teacher: metrics against a plain per-position reference, the PNG, the
TensorBoard scalars read back, and `--calibrate` writing the threshold the export then loads.

Run alone: `.venv/bin/python -m pytest tests/test_evaluate.py -q`
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spellm_ds.charset import CharTable
from spellm_ds.cli import main as cli_main
from spellm_ds.data.shards import (
    ShardEntry,
    encode_sample,
    make_index,
    sample_key,
    shard_name,
    write_shard,
)
from spellm_ds.errors import SpellmError
from spellm_ds.eval.evaluate import evaluate
from spellm_ds.eval.metrics import (
    JSON_KEYS,
    auroc,
    calibrate_threshold,
    calibration_samples,
    curve_at,
    figure_part,
    match_flags,
    summarize,
    threshold_sweep,
)
from spellm_ds.export.write import save_export
from spellm_ds.inference.model import SpeLLMForCausalLM
from spellm_ds.jsonio import write_json
from spellm_ds.model.student import build_spellm_model
from tests.export_helpers import probe_heads

SEQ_LEN, SAMPLES = 24, 6


# ---------------------------------------------------------------------------------------------------------
# Hand-built cases


def test_auroc_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered right
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    assert auroc(np.array([0.2, 0.2, 0.5, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(0.875)
    assert auroc(np.array([0.3, 0.1]), np.array([1, 1])) is None


ENT = np.array([0.0, 0.1, 0.1, 0.3, 0.5])
CHAR_OK = np.array([1, 1, 0, 1, 0], dtype=bool)
FB_OK = np.array([1, 1, 1, 0, 1], dtype=bool)


def test_threshold_sweep_and_calibration_by_hand():
    sw = threshold_sweep(ENT, CHAR_OK, FB_OK)
    # τ=-1: all fallback 4/5; τ=0: 1 + 3; τ=0.1: 2 + 1; τ=0.3: 3 + 1; τ=0.5: 3 + 0 (out of 5)
    assert sw.thresholds.tolist() == [-1.0, 0.0, 0.1, 0.3, 0.5]
    assert sw.agreement.tolist() == pytest.approx([0.8, 0.8, 0.6, 0.8, 0.6])
    assert sw.fallback_rate.tolist() == pytest.approx([1.0, 0.8, 0.4, 0.2, 0.0])
    cal = calibrate_threshold(ENT, CHAR_OK, FB_OK, target=0.8)
    assert cal["threshold"] == pytest.approx(0.3)
    assert cal["fallback_rate"] == pytest.approx(0.2) and cal["target_reached"]
    cal = calibrate_threshold(ENT, CHAR_OK, FB_OK, target=0.9)  # unreachable: the best, largest τ
    assert cal["threshold"] == pytest.approx(0.3) and not cal["target_reached"]
    agree, rate = curve_at(ENT, CHAR_OK, FB_OK, np.array([0.05, 0.2, 1.0]))
    assert agree.tolist() == pytest.approx([0.8, 0.6, 0.6])
    assert rate.tolist() == pytest.approx([0.8, 0.4, 0.0])


def test_calibration_samples_are_evenly_spread_by_hand():
    assert calibration_samples(6, 0.5).tolist() == [False, True, False, True, False, True]
    # f = 0.4: floor(0.4 i) steps up after i = 2 and i = 4
    assert calibration_samples(5, 0.4).tolist() == [False, False, True, False, True]
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(SpellmError, match="calibration fraction"):
            calibration_samples(4, bad)


def test_figure_parts_name_where_each_key_is_read():
    assert figure_part("threshold") == figure_part("threshold_approximate") == "calibration"
    for key in ("fallback_rate", "agreement_top1_with_fallback_approximate", "target_reached"):
        assert figure_part(key) == "report", key
    assert figure_part("exact_or_prefix_top5") == figure_part("char_acc") == "all"


def _threshold_cases(entropy, char_ok):
    n = len(entropy)
    ones = np.ones(n, dtype=bool)
    return dict(
        entropy=np.asarray(entropy, dtype=np.float64),
        miss=~ones,
        exact_top1=np.asarray(char_ok, dtype=bool),
        exact_top5=ones,
        exact_or_prefix_top1=ones,
        exact_or_prefix_top5=ones,
        any_prefix_top5=ones,
        exact_top1_autocorrect=np.asarray(char_ok, dtype=bool),
        exact_top5_autocorrect=ones,
        exact_or_prefix_top5_autocorrect=ones,
        any_prefix_top5_autocorrect=ones,
        fallback_top1=ones,
        fallback_top5=ones,
        char_ok=np.ones((n, 2), dtype=bool),
        head_valid=ones,
        top1_length=np.ones(n, dtype=np.int64),
    )


def test_summarize_chooses_the_threshold_on_one_part_and_reads_it_on_the_other():
    cases = _threshold_cases([0.0, 0.1, 0.2, 0.0, 0.1, 0.2], [1, 1, 0, 1, 0, 1])
    split = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    res = summarize(cases, k=2, num_chars=10, target=0.99, calibration=split)
    # Calibration part: only the char miss at 0.2 must fall back, so τ = 0.1 (the largest that reaches 99%).
    assert res["threshold"] == pytest.approx(0.1)
    assert res["calibration_positions"] == 3 and res["report_positions"] == 3
    # Report part at τ = 0.1: 0.0 right on the char path, 0.1 wrong on the char path, 0.2 falls back (right).
    assert res["fallback_rate"] == pytest.approx(1 / 3)
    assert res["agreement_top1_with_fallback"] == pytest.approx(2 / 3) and not res["target_reached"]
    assert res["calibration_part"]["agreement_top1_with_fallback"] == 1.0
    assert res["calibration_part"]["fallback_rate"] == pytest.approx(1 / 3)
    # In-sample on all six: both misses (0.1 and 0.2) must fall back, so τ = 0.0 and 4 of 6 fall back.
    whole = summarize(cases, k=2, num_chars=10, target=0.99)
    assert whole["threshold"] == 0.0 and whole["fallback_rate"] == pytest.approx(4 / 6)
    assert whole["agreement_top1_with_fallback"] == 1.0 and whole["calibration_positions"] == 6
    with pytest.raises(SpellmError, match="calibration split"):
        summarize(cases, k=2, num_chars=10, calibration=np.ones(6, dtype=bool))


def _flags(surfaces, k, pred_texts, pred_tokens, topk):
    table = CharTable.from_surfaces(surfaces, k=k)
    enc = table.charset.encode

    def row(text):
        r = enc(text)
        return r + [0] * (k - len(r))

    flags = match_flags(
        torch.tensor(pred_tokens),
        torch.tensor([row(t) for t in pred_texts]),
        torch.tensor(topk),
        torch.from_numpy(table.token_chars.astype(np.int64)),
        torch.from_numpy(table.decodable),
        torch.from_numpy(table.truncated & ~table.unknown),
    )
    return table, {key: v.tolist() for key, v in flags.items()}


def test_match_flags_by_hand():
    surfaces = ["the", " the", "th", "t", "them", "x", "the"]  # id 6 repeats "the": not decodable
    table, f = _flags(
        surfaces,
        6,
        ["th", "the", "", "thx", "t", "the"],
        [2, 0, -1, -1, 3, 0],
        [
            [4, 0, 5, 3, 1],
            [0, 1, 2, 3, 4],
            [3, 0, 1, 2, 4],
            [4, 0, 2, 3, 1],
            [5, 1, 4, 2, 0],
            [6, 5, 1, 3, 3],
        ],
    )
    assert table.decodable.tolist() == [True, True, True, True, True, True, False]
    assert f["exact_top1"] == [False, True, False, False, False, False]
    assert f["exact_top5"] == [False, True, False, False, False, False]
    # No token is longer than k = 6: every strict match is an exact one.
    assert f["exact_or_prefix_top1"] == f["exact_top1"]
    assert f["exact_or_prefix_top5"] == f["exact_top5"]
    # Lenient: "th" starts "them"; "the" exact; empty never; "thx" nothing; "t" starts "them"; "the" vs the
    # undecodable 6 (not eligible) and "x", " the", "t": nothing
    assert f["any_prefix_top5"] == [True, True, False, False, True, False]


def test_strict_prefix_needs_all_k_chars_of_a_longer_candidate():
    k = 3
    # 0 "the" (3) | 1 " the" (4: row " th") | 2 "th" | 3 "t" | 4 "them" (4: row "the", shadowed by 0)
    # 5 "x" | 6 " them" (5: row " th", shadowed by 1) | 7 "xyzw" (4: row "xyz")
    surfaces = ["the", " the", "th", "t", "them", "x", " them", "xyzw"]
    table, f = _flags(
        surfaces,
        k,
        ["t", " th", "the", "xyz", "", "th", "x"],
        [3, 1, 0, 7, -1, 2, 5],
        [
            [2, 0, 4, 6, 7],  # one character that starts "th", "the", "them": no match
            [6, 0, 2, 3, 5],  # " th" = the first 3 chars of " them" (longer than k): a prefix match
            [4, 1, 2, 3, 5],  # "the" (all k chars) = the first 3 of "them": a prefix match
            [7, 0, 1, 2, 3],  # "xyz" decodes to "xyzw" itself: exact
            [0, 1, 2, 3, 4],  # empty: never a match
            [0, 4, 1, 3, 5],  # "th" (2 of 3 chars) starts "the" and "them": no match
            [7, 0, 1, 2, 3],  # "x" starts "xyzw" but has 1 of 3 chars: no match
        ],
    )
    assert table.truncated.tolist() == [False, True, False, False, True, False, True, True]
    assert not table.decodable[4] and not table.decodable[6] and table.decodable[7]
    assert f["exact_top5"] == [False, False, False, True, False, False, False]
    assert f["exact_or_prefix_top5"] == [False, True, True, True, False, False, False]
    assert f["exact_or_prefix_top1"] == [False, True, True, True, False, False, False]
    # The lenient figure adds every non-empty string that starts a decodable candidate.
    assert f["any_prefix_top5"] == [True, True, True, True, False, True, True]


def test_summarize_buckets_by_hand():
    k = 3
    cases = {
        "entropy": np.array([0.0, 0.005, 0.3, 0.3, 3.0]),
        "miss": np.array([0, 0, 1, 0, 1], dtype=bool),
        "exact_top1": np.array([1, 0, 0, 1, 0], dtype=bool),
        "exact_top5": np.array([1, 1, 0, 1, 0], dtype=bool),
        "exact_or_prefix_top1": np.array([1, 0, 0, 1, 0], dtype=bool),
        "exact_or_prefix_top5": np.array([1, 1, 0, 1, 1], dtype=bool),
        "any_prefix_top5": np.array([1, 1, 1, 1, 1], dtype=bool),
        "exact_top1_autocorrect": np.array([1, 0, 1, 1, 0], dtype=bool),
        "exact_top5_autocorrect": np.array([1, 1, 1, 1, 0], dtype=bool),
        "exact_or_prefix_top5_autocorrect": np.array([1, 1, 1, 1, 1], dtype=bool),
        "any_prefix_top5_autocorrect": np.array([1, 1, 1, 1, 1], dtype=bool),
        "fallback_top1": np.array([1, 1, 1, 1, 1], dtype=bool),
        "fallback_top5": np.array([1, 1, 1, 1, 1], dtype=bool),
        "char_ok": np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=bool),
        "head_valid": np.array([1, 1, 1, 1, 0], dtype=bool),
        "top1_length": np.array([1, 2, 5, -1, 2]),
    }
    res = summarize(cases, k=k, num_chars=10, target=0.99)
    assert res["positions"] == 5
    assert res["exact_top1"] == pytest.approx(0.4) and res["exact_or_prefix_top5_autocorrect"] == 1.0
    assert res["char_acc_per_head"] == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    # lengths: "1" → pos 0; "2" → pos 1, 4; ">3" → pos 2; "unk" → pos 3
    assert res["by_length"]["1"]["count"] == 1 and res["by_length"]["2"]["count"] == 2
    assert res["by_length"]["2"]["exact_top1_autocorrect"] == pytest.approx(0.0)
    # char_acc by length over head-valid positions: "1" → pos 0 (3/3); "2" → pos 1 only (1/3; pos 4 is
    # not head-valid); ">3" → pos 2 (0/3); "unk" → pos 3 (2/3)
    assert res["by_length"]["1"]["char_acc"] == pytest.approx(1.0)
    assert res["by_length"]["2"]["char_acc"] == pytest.approx(1 / 3)
    assert res["by_length"][">3"]["char_acc"] == pytest.approx(0.0)
    assert res["by_length"]["unk"]["char_acc"] == pytest.approx(2 / 3)
    assert res["by_length"]["3"]["char_acc"] is None
    assert res["char_acc"] == pytest.approx(6 / 12)
    assert res["by_length"][">3"]["count"] == 1 and res["by_length"]["unk"]["count"] == 1
    assert res["by_length"]["3"]["count"] == 0
    # entropy bins [0,0.01) holds 2, [0.22,0.5) holds 2, [2,inf) holds 1
    assert res["by_entropy"]["[0,0.01)"]["count"] == 2 and res["by_entropy"]["[0.22,0.5)"]["count"] == 2
    assert res["by_entropy"]["[2,inf)"]["exact_top1_autocorrect"] == 0.0
    assert res["by_entropy"]["[0.22,0.5)"]["exact_or_prefix_top5"] == pytest.approx(0.5)
    assert "by_teacher_confidence" not in res  # no teacher probabilities in these cases
    # by the teacher's top-1 probability: [0,0.2) → pos 0, 4; [0.4,0.6) → pos 2 (the one strict miss);
    # [0.95,1] → pos 1 and pos 3 (probability 1 sits in the closed last bin)
    cases["teacher_top1_prob"] = np.array([0.1, 0.97, 0.5, 1.0, 0.15])
    conf = summarize(cases, k=k, num_chars=10, target=0.99)["by_teacher_confidence"]
    assert [c["count"] for c in conf.values()] == [2, 0, 1, 0, 0, 2]
    assert list(conf)[-1] == "[0.95,1]"
    assert conf["[0,0.2)"]["exact_top1_autocorrect"] == pytest.approx(0.5)
    assert conf["[0,0.2)"]["exact_or_prefix_top5"] == pytest.approx(1.0)
    assert conf["[0.4,0.6)"]["exact_or_prefix_top5"] == pytest.approx(0.0)
    assert conf["[0.4,0.6)"]["share_of_strict_misses"] == pytest.approx(1.0)
    assert (
        conf["[0.2,0.4)"]["share_of_strict_misses"] == 0.0
        and conf["[0.2,0.4)"]["exact_top1_autocorrect"] is None
    )
    assert conf["[0.95,1]"]["exact_top1_autocorrect"] == pytest.approx(0.5)
    # char path top-1 agreement 3/5; the fallback is always right. Reaching 0.99 needs the miss at entropy
    # 0.005 on the fallback, so τ = 0.0: everything above it (4 of 5) falls back
    assert res["threshold"] == 0.0 and res["fallback_rate"] == pytest.approx(0.8)
    assert res["agreement_top1_with_fallback"] == 1.0
    # errors (top-1 with AutoCorrect wrong) at entropies 0.005 and 3.0 vs right at 0.0, 0.3, 0.3:
    # 0.005 beats 0.0 only (1 of 3); 3.0 beats all three → 4 / 6
    assert res["auroc_entropy_error_top1"] == pytest.approx(4 / 6)


# ---------------------------------------------------------------------------------------------------------
# End to end on real shards


@pytest.fixture(scope="module")
def shards(tiny_llama, docs_files, tmp_path_factory):
    """A held-out dataset built from the tiny model as its own teacher (top-5 of its logits)."""
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    text = docs_files[-1].read_text(encoding="utf-8")[:4000]
    ids = tok(text)["input_ids"][: SEQ_LEN * SAMPLES]
    batch = torch.tensor(ids).view(SAMPLES, SEQ_LEN)
    with torch.no_grad():
        logp = teacher(batch).logits.float().log_softmax(-1)
    top = logp.topk(5, dim=-1)
    out = tmp_path_factory.mktemp("heldout")
    payloads = [
        (
            sample_key(i),
            encode_sample(batch[i].numpy(), top.indices[i].numpy(), top.values[i].half().numpy(), len(tok)),
        )
        for i in range(SAMPLES)
    ]
    nbytes, sha = write_shard(out / shard_name(0), payloads)
    entry = ShardEntry(
        name=shard_name(0),
        index=0,
        samples=SAMPLES,
        tokens=SAMPLES * SEQ_LEN,
        bytes=nbytes,
        sha256=sha,
        first_sample=0,
    )
    from spellm_ds.fingerprint import tokenizer_hash

    index = make_index(
        teacher={"path": str(tiny_llama)},
        tokenizer_hash=tokenizer_hash(tok),
        vocab_size=len(tok),
        eos_id=tok.eos_token_id,
        seq_len=SEQ_LEN,
        top_k=5,
        samples_per_shard=SAMPLES,
        build_args={},
        entries=[entry],
    )
    write_json(out / "index.json", index)
    return out, batch, top.indices


@pytest.fixture(scope="module")
def export_dir(tiny_llama, shards, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    table = CharTable.build(tok, k=10, vocab_size=len(tok))
    model = build_spellm_model(tiny_llama, k=10, num_chars=table.charset.size, trainable_layers=0).eval()
    probe_heads(model, table, shards[1][: SAMPLES // 2])  # fit on half the samples: imperfect heads
    out = tmp_path_factory.mktemp("eval_export") / "model"
    save_export(model, table, out, base_model=tiny_llama, step=7)
    return out


def _reference(model, batch, topk):
    """Plain per-position figures from string rows (no lookup structure): strict and lenient top-5 match,
    char accuracy by the top-1's spelled length, and the strict flag of every position (row-major)."""
    table = model.table
    k = table.k
    rows = {tuple(int(x) for x in table.token_chars[v]): int(v) for v in np.flatnonzero(table.decodable)}
    with torch.no_grad():
        logits = model(batch).char_logits
    strict, lenient, by_len = [], [], {}
    for b in range(batch.shape[0]):
        for t in range(batch.shape[1]):
            chars = logits[b, t].argmax(-1).tolist()
            s = chars[: chars.index(0)] if 0 in chars else chars
            tok = rows.get(tuple(s + [0] * (k - len(s))), -1)
            hit = loose = False
            for c in topk[b, t].tolist():
                crow = table.token_chars[c].tolist()
                longer = table.lengths[c] > k and not table.unknown[c]
                hit |= tok == c or (len(s) == k and longer and crow == s)
                loose |= hit or (bool(table.decodable[c]) and bool(s) and crow[: len(s)] == s)
            strict.append(hit)
            lenient.append(loose)
            top1 = int(topk[b, t, 0])
            if table.decodable[top1]:
                length = int(table.lengths[top1])
                name = "unk" if table.unknown[top1] else (str(length) if length <= k else f">{k}")
                row = table.token_chars[top1].tolist()
                by_len.setdefault(name, []).extend(int(chars[h] == row[h]) for h in range(k))
    by_len_acc = {n: float(np.mean(v)) for n, v in by_len.items()}
    return float(np.mean(strict)), float(np.mean(lenient)), by_len_acc, np.array(strict)


def test_eval_cli_end_to_end(export_dir, shards, tiny_llama, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loc, batch, topk = shards
    jpath, tb = tmp_path / "eval.json", tmp_path / "tb"
    args = ["eval", "--model", str(export_dir), "--shards", str(loc), "--json", str(jpath)]
    rc = cli_main([*args, "--tb-dir", str(tb), "--calibrate", "--target", "0.95"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(jpath.read_text())
    for key in JSON_KEYS:
        assert key in res
    assert res["positions"] == SAMPLES * SEQ_LEN and res["samples"] == SAMPLES
    # Samples 1, 3, 5 choose the threshold; 0, 2, 4 report what it costs.
    assert res["split"]["calibration_samples"] == [1, 3, 5] and res["split"]["report_samples"] == [0, 2, 4]
    assert res["calibration_positions"] == res["report_positions"] == SAMPLES // 2 * SEQ_LEN
    # The fallback is the teacher's own head on the same hidden state: it always agrees with top-1.
    assert res["fallback_top1"] == 1.0 and res["target_reached"]
    assert res["agreement_top1_with_fallback"] >= 0.95
    model = SpeLLMForCausalLM.from_pretrained(export_dir)
    assert model.threshold == pytest.approx(res["threshold"])  # --calibrate wrote it
    strict, lenient, char_by_len, strict_flags = _reference(model, batch, topk)
    assert res["exact_or_prefix_top5"] == pytest.approx(strict)
    # Misses by the teacher's confidence: its top-1 probability from a plain forward, rounded to float16
    # as the shards store it, binned by hand.
    with torch.no_grad():
        p1 = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()(batch).logits.float()
    p1 = p1.log_softmax(-1).max(-1).values.half().float().exp().reshape(-1).numpy()
    edges = [0.0, 0.2, 0.4, 0.6, 0.8, 0.95]
    names = ["[0,0.2)", "[0.2,0.4)", "[0.4,0.6)", "[0.6,0.8)", "[0.8,0.95)", "[0.95,1]"]
    conf = res["by_teacher_confidence"]
    assert list(conf) == names
    for i, name in enumerate(names):
        inside = (p1 >= edges[i]) & ((p1 < edges[i + 1]) if i + 1 < len(edges) else (p1 <= 1.0))
        assert conf[name]["count"] == int(inside.sum()), name
        if inside.any():
            assert conf[name]["exact_or_prefix_top5"] == pytest.approx(strict_flags[inside].mean()), name
        share = (~strict_flags & inside).sum() / (~strict_flags).sum()
        assert conf[name]["share_of_strict_misses"] == pytest.approx(share), name
    assert sum(c["count"] for c in conf.values()) == res["positions"]
    assert res["any_prefix_top5"] == pytest.approx(lenient)
    assert res["any_prefix_top5"] >= res["exact_or_prefix_top5"]
    for name, acc in char_by_len.items():
        assert res["by_length"][name]["char_acc"] == pytest.approx(acc), name
    assert 0 < res["exact_top1"] < 1 and res["lookup_miss_rate"] > 0
    assert res["exact_or_prefix_top5_autocorrect"] >= res["exact_or_prefix_top5"]
    png = jpath.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = EventAccumulator(str(tb))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for key in ("exact_top1", "exact_or_prefix_top5", "fallback_rate", "threshold"):
        (ev,) = acc.Scalars(f"eval/{key}")
        assert ev.value == pytest.approx(res[key], rel=1e-6) and ev.step == 7
    curve = acc.Scalars("eval_threshold/agreement_top1")
    assert len(curve) == len(res["curve"]["threshold"]) and "eval_threshold/fallback_rate" in scalars
    out = capsys.readouterr().out
    assert "exact_or_prefix_top5" in out and "written to" in out


def test_eval_refuses_other_tokenizer(export_dir, shards, tmp_path):
    loc = shards[0]
    other = tmp_path / "other"
    other.mkdir()
    index = json.loads((loc / "index.json").read_text())
    index["tokenizer_hash"] = "0" * 64
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(SpellmError, match="not this model's data"):
        evaluate(export_dir, other, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Exact and approximate fallback


@pytest.fixture(scope="module")
def moved_exports(tiny_llama, shards, tmp_path_factory):
    """Exports of a student whose last 2 MLPs moved away from the teacher, with and without the originals."""
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    table = CharTable.build(tok, k=10, vocab_size=len(tok))
    model = build_spellm_model(tiny_llama, k=10, num_chars=table.charset.size, trainable_layers=2).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.base.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std())
    probe_heads(model, table, shards[1][: SAMPLES // 2])
    root = tmp_path_factory.mktemp("moved")
    save_export(model, table, root / "exact", base_model=tiny_llama, step=3)
    save_export(model, table, root / "approx", base_model=tiny_llama, step=3, original_mlps=False)
    return root


def test_eval_reports_exact_and_approximate_fallback(moved_exports, shards, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loc, batch, topk = shards
    export = moved_exports / "exact"
    jpath, tb = tmp_path / "eval.json", tmp_path / "tb"
    args = ["eval", "--model", str(export), "--shards", str(loc), "--json", str(jpath), "--tb-dir", str(tb)]
    assert cli_main([*args, "--calibrate", "--target", "0.97"]) == 0, capsys.readouterr().err
    res = json.loads(jpath.read_text())
    # Independent: the approximate fallback is the student's own logits (plain transformers on the full
    # export, which holds the moved MLPs); the exact one is the teacher, whose argmax the shards hold.
    student = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    with torch.no_grad():
        approx_top1 = (student(batch).logits.argmax(-1) == topk[..., 0]).float().mean().item()
    assert res["fallback"] == "exact"
    assert res["fallback_top1"] == 1.0 and res["fallback_top5"] == 1.0
    assert res["fallback_top1_approximate"] == pytest.approx(approx_top1) and approx_top1 < 0.9
    # The exact fallback always agrees with the teacher, so any target is within reach.
    assert res["target_reached"] and res["agreement_top1_with_fallback"] >= 0.97
    curve = res["curve"]
    assert curve["agreement_top1"] == curve["agreement_top1_exact"]
    assert len(curve["agreement_top1_approximate"]) == len(curve["threshold"])
    assert all(e >= a for e, a in zip(curve["agreement_top1_exact"], curve["agreement_top1_approximate"]))
    # --calibrate took the exact kind's threshold and recorded both; loading picks the one of its kind.
    cfg = json.loads((export / "spellm_config.json").read_text())
    assert cfg["calibration"]["fallback"] == "exact" and cfg["fallback_threshold"] == res["threshold"]
    assert cfg["fallback_thresholds"] == {
        "exact": res["threshold"],
        "approximate": res["threshold_approximate"],
    }
    assert SpeLLMForCausalLM.from_pretrained(export).threshold == res["threshold"]
    approx = SpeLLMForCausalLM.from_pretrained(export, fallback="approximate")
    assert approx.threshold == res["threshold_approximate"]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("agreement_top1", "agreement_top1_exact", "agreement_top1_approximate", "fallback_rate"):
        assert len(acc.Scalars(f"eval_threshold/{key}")) == len(curve["threshold"]), key
    assert {"eval/fallback_top1", "eval/fallback_top1_approximate", "eval/threshold_approximate"} <= tags
    out = capsys.readouterr().out
    assert "exact fallback" in out and "fallback_top1_approximate" in out and "fall back)" in out
    # An export without the original MLPs is evaluated with the approximate fallback, the same figures.
    plain = evaluate(moved_exports / "approx", loc, plot=tmp_path / "a.png", progress=False)
    assert plain["fallback"] == "approximate" and "agreement_top1_exact" not in plain["curve"]
    for key in ("fallback_top1", "threshold", "fallback_rate", "agreement_top1_with_fallback"):
        assert plain[key] == plain[f"{key}_approximate"] == pytest.approx(res[f"{key}_approximate"]), key
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
