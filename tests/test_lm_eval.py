"""lm-evaluation-harness model `spellm` on the three local tasks in tests/data/lm_eval (multiple choice,
generation up to a newline, rolling perplexity), through the real `lm_eval.simple_evaluate`, offline.

The student is a tiny Llama whose last two MLPs were moved away from the base model's and whose char
heads were probed on some text. Expected values never come from `spellm_ds.eval.harness`:

- always falling back (negative threshold) with the exact fallback gives lm-eval's own `hf` model on the
  base model directory, sample by sample, for all three tasks; the approximate fallback gives `hf` on the
  export directory (the student's own lm_head) and differs from the base model;
- the char path (threshold none) differs from `hf`, and its multiple-choice log-likelihoods and
  accuracies are recomputed here from the exported heads, the `[V, k]` char table and the base model's
  logits by plain numpy;
- generation with stop sequences and chunked decoding equals `hf`'s `generate_until` on the base model;
- `spellm-ds lm-eval-local` and `python -m spellm_ds.eval.harness` run from another working directory.

Run alone: `.venv/bin/python -m pytest tests/test_lm_eval.py -q`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytest.importorskip("lm_eval")

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from spellm_ds.cli import main as cli_main
from spellm_ds.errors import SpellmError
from spellm_ds.eval.harness import SpeLLMEvalLM, parse_threshold
from spellm_ds.eval.tasks import local_task_dir
from spellm_ds.export.write import save_export
from spellm_ds.model.student import build_spellm_model
from tests.export_helpers import probe_heads

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "data" / "lm_eval"
TASKS = ["spellm_mc", "spellm_gen", "spellm_ppl"]
TRAINED = 2
RECORDED_THRESHOLD = 0.7
PROBE_TEXT = (
    "Question: Which keyword defines a function in Python? Answer: def. The module defines a class, and "
    "the function returns the value of the list. A dictionary maps keys to values; the file is opened."
)


@pytest.fixture(scope="module")
def export_dir(tiny_llama, tok, table, tmp_path_factory):
    """A full export whose trained MLPs moved away from the base (so char path and approximate differ)."""
    model = build_spellm_model(
        tiny_llama, k=10, num_chars=table.charset.size, trainable_layers=TRAINED
    ).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name != "char_heads.weight":
                p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std())
    probe_heads(model, table, tok(PROBE_TEXT, return_tensors="pt")["input_ids"])
    out = tmp_path_factory.mktemp("lm_eval_export") / "export"
    save_export(model, table, out, base_model=tiny_llama, threshold=RECORDED_THRESHOLD)
    return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return local_task_dir(TASKS_DIR, tmp_path_factory.mktemp("lm_eval_tasks"))


def _run(model, model_args, tasks_dir, tasks=TASKS, **kw):
    """lm-eval's own `simple_evaluate` on the local tasks; returns (results, samples by task and doc)."""
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks),
        task_manager=manager,
        device="cpu",
        batch_size=2,
        log_samples=True,
        **kw,
    )
    samples = {t: {s["doc_id"]: s for s in res["samples"][t]} for t in tasks}
    return res, samples


def _lls(sample):
    """Per-choice (or per-document) log-likelihoods of one logged sample."""
    return [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in sample["filtered_resps"]]


@pytest.fixture(scope="module")
def hf_base(tiny_llama, tasks_dir):
    return _run("hf", f"pretrained={tiny_llama}", tasks_dir)


@pytest.fixture(scope="module")
def always_exact(export_dir, tasks_dir):
    lm = SpeLLMEvalLM(
        pretrained=str(export_dir), fallback="exact", threshold=-1.0, device="cpu", batch_size=2
    )
    return lm, _run(lm, None, tasks_dir)


@pytest.fixture(scope="module")
def char_path(export_dir, tasks_dir):
    lm = SpeLLMEvalLM(pretrained=str(export_dir), threshold="none", device="cpu", batch_size=2)
    return lm, _run(lm, None, tasks_dir)


# ---------------------------------------------------------------------------------------------------------


def test_parse_threshold():
    assert parse_threshold("default") == "default"
    assert parse_threshold(None) is None and parse_threshold("none") is None
    assert parse_threshold(-1) == -1.0 and parse_threshold("0.25") == 0.25
    with pytest.raises(SpellmError, match="threshold"):
        parse_threshold("high")


def test_local_task_dir_makes_data_paths_absolute(tasks_dir):
    import yaml

    for name in TASKS:
        cfg = yaml.safe_load((tasks_dir / f"{name}.yaml").read_text())
        path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert path.is_absolute() and path.parent == TASKS_DIR.resolve(), path
    with pytest.raises(SpellmError, match="does not exist"):
        local_task_dir(TASKS_DIR / "missing", tasks_dir / "x")


def test_always_exact_fallback_equals_hf_on_the_base_model(always_exact, hf_base):
    lm, (res, samples) = always_exact
    base_res, base_samples = hf_base
    assert lm.fallback == "exact" and lm.threshold == -1.0
    for task in TASKS:
        for doc_id, want in base_samples[task].items():
            got = samples[task][doc_id]
            if task == "spellm_gen":
                assert got["filtered_resps"] == want["filtered_resps"], doc_id
            else:
                assert _lls(got) == pytest.approx(_lls(want), abs=2e-4), (task, doc_id)
    r, b = res["results"], base_res["results"]
    assert r["spellm_mc"]["acc,none"] == b["spellm_mc"]["acc,none"]
    assert r["spellm_mc"]["acc_norm,none"] == b["spellm_mc"]["acc_norm,none"]
    assert r["spellm_gen"]["exact_match,none"] == b["spellm_gen"]["exact_match,none"]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert r["spellm_ppl"][key] == pytest.approx(b["spellm_ppl"][key], rel=1e-5)
    # Every scored position and every generated token came from the fallback.
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        c = lm.counters[kind]
        assert c["positions"] > 0 and c["fallback"] == c["positions"], (kind, c)
        assert lm.rates()[kind]["fallback"] == 1.0


def _char_path_lls(export_dir, base_dir, tok, table, doc):
    """Per-choice log-likelihoods of the char path (threshold none, exact fallback for undecodable mass),
    recomputed from the exported heads, the char table and the base model's own logits."""
    student = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    w = load_file(str(export_dir / "char_heads.safetensors"))["weight"].double()
    k, c = table.k, table.charset.size
    decodable = np.flatnonzero(table.decodable)
    chars = table.token_chars[decodable]  # [V', k]
    context = f"Question: {doc['question']}\nAnswer:"
    out = []
    for choice in doc["choices"]:
        ctx = tok.encode(context)
        cont = tok.encode(context + " " + choice)[len(ctx) :]
        ids = torch.tensor([(ctx + cont)[:-1]])
        with torch.no_grad():
            hidden = student.model(input_ids=ids).last_hidden_state[0].double()
            q = base(input_ids=ids).logits[0].double().log_softmax(-1).numpy()
        head_logp = (hidden @ w.T).view(-1, k, c).log_softmax(-1).numpy()
        total = 0.0
        for j, target in enumerate(cont):
            t = len(ctx) - 1 + j
            scores = np.zeros(len(decodable))
            for i in range(k):
                scores += head_logp[t, i, chars[:, i]]
            log_z = np.logaddexp.reduce(scores)
            outside = np.ones(q.shape[1], dtype=bool)
            outside[decodable] = False
            log_one_plus_q = np.log1p(np.exp(q[t, outside]).sum())
            where = np.flatnonzero(decodable == target)
            if where.size:
                total += scores[where[0]] - log_z - log_one_plus_q
            else:
                total += q[t, target] - log_one_plus_q
        out.append(total)
    return out


def test_char_path_differs_from_hf_and_matches_a_plain_recomputation(
    char_path, hf_base, export_dir, tiny_llama, tok, table
):
    lm, (res, samples) = char_path
    base_res, base_samples = hf_base
    assert lm.threshold is None and lm.fallback == "exact"
    docs = [json.loads(line) for line in (TASKS_DIR / "mc.jsonl").read_text().splitlines()]
    acc, acc_norm, moved = [], [], 0.0
    for doc_id, doc in enumerate(docs):
        want = _char_path_lls(export_dir, tiny_llama, tok, table, doc)
        got = _lls(samples["spellm_mc"][doc_id])
        assert got == pytest.approx(want, abs=2e-3), doc_id
        moved = max(moved, float(np.abs(np.array(got) - _lls(base_samples["spellm_mc"][doc_id])).max()))
        acc.append(float(np.argmax(want) == doc["label"]))
        lengths = np.array([len(ch) for ch in doc["choices"]], dtype=float)
        acc_norm.append(float(np.argmax(np.array(want) / lengths) == doc["label"]))
    assert moved > 0.1  # the char path is not the base model
    assert res["results"]["spellm_mc"]["acc,none"] == pytest.approx(np.mean(acc))
    assert res["results"]["spellm_mc"]["acc_norm,none"] == pytest.approx(np.mean(acc_norm))
    ppl, base_ppl = res["results"]["spellm_ppl"], base_res["results"]["spellm_ppl"]
    assert ppl["word_perplexity,none"] != pytest.approx(base_ppl["word_perplexity,none"], rel=1e-3)
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        c = lm.counters[kind]
        assert c["positions"] > 0 and c["fallback"] == 0, (kind, c)
        assert c["exact"] + c["autocorrect"] == c["positions"]
    assert lm.counters["loglikelihood_rolling"]["exact"] > 0


def test_approximate_fallback_equals_hf_on_the_export(export_dir, tasks_dir, hf_base):
    # The export directory is an HF model: the student's body with the original lm_head, i.e. exactly
    # the approximate fallback; it is not the base model.
    _, spellm_samples = _run(
        "spellm", f"pretrained={export_dir},fallback=approximate,threshold=-1", tasks_dir, tasks=["spellm_mc"]
    )
    _, student_samples = _run("hf", f"pretrained={export_dir}", tasks_dir, tasks=["spellm_mc"])
    base_samples = hf_base[1]
    moved = 0.0
    for doc_id, want in student_samples["spellm_mc"].items():
        got = _lls(spellm_samples["spellm_mc"][doc_id])
        assert got == pytest.approx(_lls(want), abs=2e-4), doc_id
        moved = max(moved, float(np.abs(np.array(got) - _lls(base_samples["spellm_mc"][doc_id])).max()))
    assert moved > 0.01


def _gen_requests(prompts, **gen_kwargs):
    return [
        Instance(request_type="generate_until", doc={}, arguments=(p, dict(gen_kwargs)), idx=0)
        for p in prompts
    ]


def test_generate_until_stops_chunks_and_samples_like_hf(export_dir, tiny_llama):
    prompts = ["The module defines", "In Python, a list is a", "Return the"]
    hf = HFLM(pretrained=str(tiny_llama), device="cpu", batch_size=3)
    lm = SpeLLMEvalLM(
        pretrained=str(export_dir), threshold=-1, device="cpu", batch_size=3, stop_check_tokens=2
    )
    free = hf.generate_until(_gen_requests(prompts, until=[], max_gen_toks=20, do_sample=False))
    assert lm.generate_until(_gen_requests(prompts, until=[], max_gen_toks=20, do_sample=False)) == free
    # A stop string from the middle of row 0's text: every row is cut at its first occurrence, and the
    # chunked decode (2, 4, 8, ... tokens) stops early yet returns what hf returns.
    stop = free[0][len(free[0]) // 2 :][:3]
    assert stop and free[0].index(stop) > 0
    kw = {"until": [stop], "max_gen_toks": 20, "do_sample": False}
    want = hf.generate_until(_gen_requests(prompts, **kw))
    assert want[0] == free[0].split(stop)[0]
    before = lm.counters["generate_until"]["positions"]
    assert lm.generate_until(_gen_requests(prompts, **kw)) == want
    assert lm.counters["generate_until"]["positions"] - before < 3 * 20
    # Sampling with a nucleus of one token is greedy; plain sampling runs under lm-eval's seed.
    narrow = _gen_requests(prompts, until=[], max_gen_toks=20, do_sample=True, temperature=1.0, top_p=1e-9)
    assert lm.generate_until(narrow) == free
    torch.manual_seed(0)
    sampled = lm.generate_until(_gen_requests(prompts, until=[], max_gen_toks=20, do_sample=True))
    assert sampled != free
    torch.manual_seed(0)
    assert lm.generate_until(_gen_requests(prompts, until=[], max_gen_toks=20, do_sample=True)) == sampled
    with pytest.raises(SpellmError, match="num_beams"):
        lm.generate_until(_gen_requests(prompts[:1], until=[], max_gen_toks=4, num_beams=4))


def test_default_threshold_is_the_exports(export_dir):
    lm = SpeLLMEvalLM(pretrained=str(export_dir), device="cpu")
    assert lm.threshold == RECORDED_THRESHOLD and lm.fallback == "exact"
    assert lm.get_model_info()["spellm_threshold"] == RECORDED_THRESHOLD


def test_lm_eval_local_cli_from_another_directory(export_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res.json"
    rc = cli_main(
        [
            "lm-eval-local",
            "--model",
            str(export_dir),
            "--tasks-dir",
            str(TASKS_DIR),
            "--tasks",
            "spellm_mc,spellm_ppl",
            "--model-args",
            "threshold=none,fallback=approximate",
            "--limit",
            "2",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"spellm_mc", "spellm_ppl"}
    assert res["spellm"]["fallback"] == "approximate" and res["spellm"]["threshold"] is None
    assert res["spellm"]["counters"]["loglikelihood"]["positions"] > 0
    assert "spellm_mc" in capsys.readouterr().out
    assert (
        cli_main(["lm-eval-local", "--model", str(export_dir), "--tasks-dir", str(TASKS_DIR), "--tasks", "x"])
        == 2
    )


def test_lm_eval_command_line_finds_the_model(export_dir, tasks_dir, tmp_path):
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "spellm_ds.eval.harness",
        "run",
        "--model",
        "spellm",
        "--model_args",
        f"pretrained={export_dir},fallback=exact,threshold=-1",
        "--tasks",
        "spellm_mc",
        "--include_path",
        str(tasks_dir),
        "--limit",
        "2",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spellm_mc" in proc.stdout and "acc" in proc.stdout
    assert "spellm loglikelihood" in proc.stderr  # the counters, on lm-eval's logger
