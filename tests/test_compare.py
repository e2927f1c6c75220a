"""Teacher-vs-student generation (spellm_ds/eval/compare.py): the agreement figures on hand-made token lists,
then `spellm-ds compare` on a tiny export whose fallback is the teacher's own head (no trained layer):
with every position falling back, the student's greedy continuations must equal transformers' own
`generate` on the teacher token for token, and without fallback they must differ somewhere.

Run alone: `.venv/bin/python -m pytest tests/test_compare.py -q`
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spellm_ds.charset import CharTable
from spellm_ds.cli import main as cli_main
from spellm_ds.errors import SpellmError
from spellm_ds.eval.compare import agreement_summary, cut_at_end, leading_agreement
from spellm_ds.export.write import save_export
from spellm_ds.model.student import build_spellm_model
from tests.export_helpers import probe_heads
from tests.test_evaluate import shards  # noqa: F401  (module fixture: held-out shards of tiny_llama)


def test_agreement_by_hand():
    assert cut_at_end([5, 6, 2, 7], {2}) == [5, 6, 2]
    assert cut_at_end([5, 6], {2}) == [5, 6]
    assert leading_agreement([1, 2, 3], [1, 2, 4, 5]) == 2
    assert leading_agreement([], [1]) == 0
    s = agreement_summary([[1, 2, 3], [9, 9], [4, 5]], [[1, 2, 4], [8, 9], [4, 5]])
    # agreements 2, 0, 2 over 3 + 2 + 2 generated tokens; one full match in three
    assert s["agreement_tokens_mean"] == pytest.approx(4 / 3)
    assert s["agreement_share"] == pytest.approx(4 / 7)
    assert s["full_match"] == pytest.approx(1 / 3)
    with pytest.raises(SpellmError):
        agreement_summary([], [])


@pytest.fixture(scope="module")
def always_fallback_export(tiny_llama, shards, tmp_path_factory):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    table = CharTable.build(tok, k=10, vocab_size=len(tok))
    model = build_spellm_model(tiny_llama, k=10, num_chars=table.charset.size, trainable_layers=0).eval()
    probe_heads(model, table, shards[1][:3])
    out = tmp_path_factory.mktemp("compare_export") / "model"
    save_export(model, table, out, base_model=tiny_llama, threshold=-1.0)
    return out


def test_compare_cli_always_fallback_equals_teacher_generate(
    always_fallback_export,
    tiny_llama,
    shards,  # noqa: F811
    tmp_path,
):
    loc, batch, _ = shards
    out = tmp_path / "cmp.json"
    args = ["compare", "--model", str(always_fallback_export), "--teacher", str(tiny_llama)]
    args += ["--shards", str(loc), "--prompts", "4", "--prompt-tokens", "8", "--new-tokens", "6"]
    args += ["--batch-size", "3", "--text", "The module", "--text-tokens", "5", "--json", str(out)]
    assert cli_main(args) == 0
    res = json.loads(out.read_text())
    fb, plain = res["settings"]["with_fallback"], res["settings"]["no_fallback"]
    assert (
        fb["prompts"] == 4
        and fb["full_match"] == 1.0
        and fb["counters"]["fallback"] == fb["counters"]["tokens"]
    )
    assert plain["counters"]["fallback"] == 0 and plain["full_match"] < 1.0
    # The reference: transformers' own greedy generate, one prompt at a time (no padding).
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    with torch.no_grad():
        ref = [
            teacher.generate(batch[i : i + 1, :8], max_new_tokens=6, do_sample=False)[0, 8:] for i in range(4)
        ]
    mean_len = sum(len(r) for r in ref) / 4
    assert fb["agreement_tokens_mean"] == pytest.approx(mean_len)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ids = tok("The module", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text = tok.decode(teacher.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1] :])
    (sample,) = res["samples"]
    assert sample["teacher"] == text == sample["with_fallback"]


def test_prompts_leave_out_the_samples_that_chose_the_threshold(shards):  # noqa: F811
    from spellm_ds.eval.compare import calibration_skip, shard_prompts

    loc, batch, _ = shards
    # An export calibrated on these 6 shards at fraction 0.5: samples 1, 3, 5 chose its threshold.
    config = {"calibration": {"shards": str(loc), "samples": 6, "calibration_fraction": 0.5}}
    skip = calibration_skip(config, loc)
    assert skip.tolist() == [False, True, False, True, False, True]
    prompts = shard_prompts(loc, 3, 5, skip)
    assert prompts == [batch[i, :5].tolist() for i in (0, 2, 4)]
    assert calibration_skip(config, loc.parent) is None  # calibrated on other shards: every sample
    assert calibration_skip({"calibration": {"shards": str(loc)}}, loc) is None  # an older export
    with pytest.raises(SpellmError, match="outside the 3 that calibrated"):
        shard_prompts(loc, 4, 5, skip)
