"""Teacher-shard building end to end with the tiny Llama fixture: packing, top-5 against the teacher's own
forward, 1-rank vs 2-rank (`mpirun`) and SLURM-array builds byte for byte, SIGKILL then rerun, resume,
refusal of a mismatched output directory, jsonl/parquet/text inputs.

Run alone: `.venv/bin/python -m pytest tests/test_build_shards.py -q` (the `dist` test needs Open MPI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spellm_ds.cli import main
from spellm_ds.data import shards
from spellm_ds.data.build import BuildConfig, build_shards
from spellm_ds.data.validate import validate_dataset
from spellm_ds.errors import SpellmError
from tests.conftest import REPO_ROOT

SEQ_LEN, PER_SHARD, BATCH, SAMPLES = 32, 4, 3, 64  # 16 shards; batches of 3 + 1 inside each shard


def _args(teacher: Path, inputs: list[str], out: Path) -> list[str]:
    return [
        "build-shards",
        "--teacher",
        str(teacher),
        "--input",
        *inputs,
        "--output",
        str(out),
        "--seq-len",
        str(SEQ_LEN),
        "--samples-per-shard",
        str(PER_SHARD),
        "--batch-size",
        str(BATCH),
        "--max-samples",
        str(SAMPLES),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--no-progress",
    ]


def _config(teacher: Path, inputs: list[str], out: Path, **kw) -> BuildConfig:
    base = dict(
        teacher=str(teacher),
        inputs=inputs,
        output=str(out),
        seq_len=SEQ_LEN,
        samples_per_shard=PER_SHARD,
        batch_size=BATCH,
        max_samples=SAMPLES,
        dtype="float32",
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return BuildConfig(**base)


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a dataset directory by name (hidden temporary files included, so leftovers show)."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI_", "SLURM_"))}
    # One thread per process: on a shared machine OpenMP spin-waiting makes 2 threads far slower than 1.
    env.update(
        PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def inputs(docs_files) -> list[str]:
    return [str(p) for p in docs_files[:8]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama, inputs) -> Path:
    """A clean single-process build that every other build is compared against byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    summary = build_shards(_config(tiny_llama, inputs, out), rank=0, world_size=1)
    assert summary.index_written and summary.shards_built == list(range(SAMPLES // PER_SHARD))
    return out


def test_packing_and_top5_match_the_teacher(reference, tiny_llama, inputs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = validate_dataset(reference)
    assert report.ok, report.problems
    index = shards.read_index(reference)
    assert index["totals"]["samples"] == SAMPLES and len(index["shards"]) == SAMPLES // PER_SHARD
    assert index["teacher"]["name"] == tiny_llama.name and index["top_k"] == 5

    # Packing, independently: each file is one document, tokenised without specials, then EOS.
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    stream: list[int] = []
    for f in inputs:
        stream += tok(Path(f).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        stream.append(tok.eos_token_id)
    samples = [
        s for i in range(len(index["shards"])) for s in shards.iter_shard(reference / shards.shard_name(i))
    ]
    assert [s["__key__"] for s in samples] == [shards.sample_key(i) for i in range(SAMPLES)]
    got = np.concatenate([s["input_ids"] for s in samples])
    np.testing.assert_array_equal(got, np.asarray(stream[: SAMPLES * SEQ_LEN]))

    # Top-5, independently: plain transformers forward, one sequence at a time, float64 log-softmax.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    ids = torch.tensor(np.stack([s["input_ids"] for s in samples]), dtype=torch.long)
    with torch.no_grad():
        logp = torch.cat(
            [torch.log_softmax(model(ids[i : i + 1]).logits.double(), -1) for i in range(SAMPLES)]
        )
    ref_lp, ref_ids = logp.topk(5, dim=-1)
    stored_ids = np.stack([s["topk_ids"] for s in samples])
    stored_lp = np.stack([s["topk_logprobs"] for s in samples]).astype(np.float64)
    np.testing.assert_allclose(stored_lp, ref_lp.numpy(), atol=5e-3, rtol=2e-3)
    # Ids must match wherever the reference ranks are not a near tie (float noise may swap exact ties).
    gaps = np.diff(ref_lp.numpy(), axis=-1)
    clear = np.concatenate(
        [gaps[..., :1] < -1e-4, (gaps[..., 1:] < -1e-4) & (gaps[..., :-1] < -1e-4)], axis=-1
    )
    clear = np.concatenate([clear, gaps[..., -1:] < -1e-4], axis=-1)
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(stored_ids[clear], ref_ids.numpy()[clear])
    assert (stored_lp <= 0).all() and (np.diff(stored_lp, axis=-1) <= 0).all()


@pytest.mark.parametrize("width", [300, 8192, 9000, 32000])
def test_group_topk_equals_torch_topk(width):
    import torch

    from spellm_ds.data.teacher_topk import topk_rows

    g = torch.Generator().manual_seed(width)
    x = torch.randn(64, width, generator=g) * 4
    x[3, 100:140] = 50.0  # ties inside one group and across groups
    x[4, -1] = 99.0  # the maximum in the tail after the last whole group
    v, i = topk_rows(x, 5)
    rv, ri = torch.topk(x, 5, dim=-1)
    assert torch.equal(v, rv)
    assert torch.equal(x.gather(1, i), rv)  # ids point at the same values (ties may pick other columns)
    assert torch.equal(i[[0, 1, 2, 4]], ri[[0, 1, 2, 4]])


@pytest.mark.parametrize("slice_vocab", [False, True])
@pytest.mark.parametrize("block", [1 << 30, 5000])
def test_streamed_topk_equals_full_log_softmax(slice_vocab, block):
    import torch

    from spellm_ds.data.teacher_topk import streamed_topk

    g = torch.Generator().manual_seed(block)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(3001, 16, generator=g) * 3
    bias = torch.randn(3001, generator=g)
    ids, lp = streamed_topk(hidden, weight, bias, 5, block, slice_vocab=slice_vocab)
    ref = torch.log_softmax((hidden.double() @ weight.double().T + bias.double()), dim=-1)
    rv, ri = ref.topk(5, dim=-1)
    assert lp.dtype == torch.float16 and ids.shape == (37, 5)
    assert torch.equal(ids, ri)
    torch.testing.assert_close(lp.double(), rv, atol=4e-3, rtol=1e-3)


@pytest.mark.dist
def test_two_rank_mpirun_build_is_byte_identical(reference, tiny_llama, inputs, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun (Open MPI) is not installed")
    out = tmp_path / "ds"
    env = _env()
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1"
    )
    cmd = ["mpirun", "-np", "2", sys.executable, "-m", "spellm_ds.cli", *_args(tiny_llama, inputs, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker 0/2" in proc.stderr and "worker 1/2" in proc.stderr
    assert _files(out) == _files(reference)


def test_slurm_array_tasks_build_byte_identical(reference, tiny_llama, inputs, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    # Array tasks may run in any order and never at the same time: the later one writes index.json.
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    first = build_shards(_config(tiny_llama, inputs, out))
    assert (first.worker, first.workers) == (1, 2)
    assert first.shards_built == list(range(1, 16, 2)) and not first.index_written
    assert not (out / "index.json").exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    second = build_shards(_config(tiny_llama, inputs, out))
    assert second.shards_built == list(range(0, 16, 2)) and second.index_written
    assert _files(out) == _files(reference)


def test_sigkill_mid_build_then_rerun_equals_clean_build(reference, tiny_llama, inputs, tmp_path):
    out = tmp_path / "ds"
    want = _files(reference)
    cmd = [sys.executable, "-m", "spellm_ds.cli", *_args(tiny_llama, inputs, out)]
    log = open(tmp_path / "log", "w")  # noqa: SIM115 (closed below; the child writes to it)
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    seen: set[str] = set()
    deadline = time.monotonic() + 240
    try:
        # Every shard file that ever becomes visible must already be complete (== the clean build's).
        # Kill as soon as the first shard's manifest exists: the build is then inside a later shard.
        while proc.poll() is None and time.monotonic() < deadline:
            for p in out.glob("shard-*.tar") if out.exists() else []:
                if p.name not in seen:
                    assert p.read_bytes() == want[p.name], f"{p.name} visible before it was complete"
                    seen.add(p.name)
            if (out / shards.manifest_name(0)).exists():
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
    assert seen, "no shard appeared before the deadline"
    assert not (out / "index.json").exists(), "the build finished before it could be killed"
    visible = {p.name for p in out.glob("shard-*.tar")}
    for name in visible:
        assert (out / name).read_bytes() == want[name]
    assert len(visible) < len(index_shards(reference))
    summary = build_shards(_config(tiny_llama, inputs, out), rank=0, world_size=1)
    assert summary.index_written and summary.shards_skipped >= 1 and 0 not in summary.shards_built
    assert _files(out) == want  # no leftover temporary file, every byte equal


def index_shards(root: Path) -> list[str]:
    return [e["name"] for e in shards.read_index(root)["shards"]]


def test_rerun_builds_only_missing_shards(reference, tiny_llama, inputs, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(reference, out)
    again = build_shards(_config(tiny_llama, inputs, out), rank=0, world_size=1)
    assert again.shards_built == [] and again.shards_skipped == 16 and again.index_written
    (out / shards.shard_name(3)).unlink()
    (out / shards.manifest_name(5)).unlink()
    (out / "index.json").unlink()
    (out / f".{shards.shard_name(7)}.tmp-host-1-abcd").write_bytes(b"partial")
    summary = build_shards(_config(tiny_llama, inputs, out), rank=0, world_size=1)
    assert summary.shards_built == [3, 5] and summary.shards_skipped == 14
    assert _files(out) == _files(reference)


def test_mismatched_output_directory_is_refused(reference, tiny_llama, inputs, tmp_path, capsys):
    from examples.local_models import make_causal_lm

    out = tmp_path / "ds"
    shutil.copytree(reference, out)
    before = _files(out)
    with pytest.raises(SpellmError, match="seq_len: recorded 32, now 16"):
        build_shards(_config(tiny_llama, inputs, out, seq_len=16), rank=0, world_size=1)
    with pytest.raises(SpellmError, match="top_k: recorded 5, now 4"):
        build_shards(_config(tiny_llama, inputs, out, top_k=4), rank=0, world_size=1)
    with pytest.raises(SpellmError, match="inputs"):
        build_shards(_config(tiny_llama, inputs[:3], out), rank=0, world_size=1)
    other = make_causal_lm(tiny_llama, tmp_path / "other_teacher", num_layers=1, seed=1)
    with pytest.raises(SpellmError, match="weights_hash"):
        build_shards(_config(other, inputs, out), rank=0, world_size=1)
    assert _files(out) == before
    # Through the CLI: one line on stderr and exit code 2.
    assert main([*_args(tiny_llama, inputs, out)[:-1], "--seq-len", "16", "--no-progress"]) == 2
    assert "different build" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SpellmError, match="not empty"):
        build_shards(_config(tiny_llama, inputs, foreign), rank=0, world_size=1)


def test_jsonl_parquet_and_text_inputs_give_identical_shards(tiny_llama, docs_files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    texts = [p.read_text(encoding="utf-8")[:1500] for p in docs_files[10:14]]
    rows = [texts[0], "", texts[1], None, texts[2], texts[3]]  # empty and null rows are skipped
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "part-0.jsonl", "w", encoding="utf-8") as fh:
        for r in rows[:3]:
            fh.write(json.dumps({"content": r, "id": 1}) + "\n")
    with open(src / "part-1.jsonl", "w", encoding="utf-8") as fh:
        for r in rows[3:]:
            fh.write(json.dumps({"content": r}) + "\n\n")
    pq.write_table(pa.table({"content": rows[:4]}), src / "a.parquet")
    pq.write_table(pa.table({"content": rows[4:]}), src / "b.parquet")
    for i, t in enumerate(texts):
        (src / f"doc{i}.txt").write_text(t, encoding="utf-8")

    builds = {}
    for kind, pattern in (("jsonl", "part-*.jsonl"), ("parquet", "*.parquet"), ("text", "doc*.txt")):
        out = tmp_path / kind
        cfg = _config(
            tiny_llama, [str(src / pattern)], out, max_samples=None, samples_per_shard=16, batch_size=8
        )
        cfg.text_field = "content"
        build_shards(cfg, rank=0, world_size=1)
        assert validate_dataset(out).ok
        builds[kind] = {k: v for k, v in _files(out).items() if k.endswith(".tar")}
    assert builds["jsonl"] == builds["parquet"] == builds["text"]

    # The final partial sequence is padded and masked; no text is dropped.
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    index = shards.read_index(tmp_path / "jsonl")
    assert index["totals"]["tokens"] == n_tokens
    assert index["totals"]["samples"] == -(-n_tokens // SEQ_LEN)
    last = list(shards.iter_shard(tmp_path / "jsonl" / index["shards"][-1]["name"]))[-1]
    tail = n_tokens % SEQ_LEN
    if tail:
        assert last["loss_mask"][:tail].all() and not last["loss_mask"][tail:].any()
        assert last["input_ids"][tail - 1] == tok.eos_token_id

    with pytest.raises(SpellmError, match="no field 'text'"):
        build_shards(_config(tiny_llama, [str(src / "part-0.jsonl")], tmp_path / "bad"), rank=0, world_size=1)


@pytest.mark.gpu
def test_gpu_build_agrees_with_cpu(reference, tiny_llama, inputs, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for name, extra in (("cuda", {"device": "cuda"}), ("devmap", {"device_map": "auto"})):
        out = tmp_path / name
        build_shards(_config(tiny_llama, inputs, out, **extra), rank=0, world_size=1)
        assert validate_dataset(out).ok
        for i in range(SAMPLES // PER_SHARD):
            for a, b in zip(
                shards.iter_shard(out / shards.shard_name(i)),
                shards.iter_shard(reference / shards.shard_name(i)),
            ):
                np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
                assert (a["topk_ids"][:, 0] == b["topk_ids"][:, 0]).mean() > 0.97
                np.testing.assert_allclose(
                    a["topk_logprobs"].astype(np.float32), b["topk_logprobs"].astype(np.float32), atol=2e-2
                )


def test_no_teacher_shards_hold_the_same_sequences_validate_and_resume(
    reference, tiny_llama, inputs, tmp_path
):
    """--no-teacher: top_k 0, input ids and masks equal to the teacher build's; a rerun rebuilds only gaps."""
    import json

    out = tmp_path / "tokens"
    # No model is loaded: a teacher directory without weights is enough (tokenizer + config.json).
    tok_only = tmp_path / "tok_only"
    shutil.copytree(tiny_llama, tok_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    summary = build_shards(_config(tok_only, inputs, out, no_teacher=True), rank=0, world_size=1)
    assert summary.index_written and summary.shards_built == list(range(SAMPLES // PER_SHARD))
    report = validate_dataset(out)
    assert report.ok, report.problems
    index, ref_index = shards.read_index(out), shards.read_index(reference)
    assert index["top_k"] == 0 and index["build_args"]["no_teacher"] is True
    assert index["totals"] == {**ref_index["totals"], "bytes": index["totals"]["bytes"]}
    for i in range(len(index["shards"])):
        got = list(shards.iter_shard(out / shards.shard_name(i)))
        ref = list(shards.iter_shard(reference / shards.shard_name(i)))
        assert [s["__key__"] for s in got] == [s["__key__"] for s in ref]
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
            np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
            assert a["topk_ids"].shape == (SEQ_LEN, 0) and a["topk_logprobs"].shape == (SEQ_LEN, 0)
    before = _files(out)
    (out / shards.shard_name(2)).unlink()
    (out / "index.json").unlink()
    again = build_shards(_config(tok_only, inputs, out, no_teacher=True), rank=0, world_size=1)
    assert again.shards_built == [2] and _files(out) == before
    # A teacher build into the token-only directory is another dataset: refused, naming the difference.
    with pytest.raises(SpellmError, match="top_k"):
        build_shards(_config(tiny_llama, inputs, out), rank=0, world_size=1)
    assert json.loads((out / "build.json").read_text())["teacher"]["weights_hash"] is None
    # Evaluation needs the teacher's top-k: refused before any model is loaded.
    from spellm_ds.eval.evaluate import evaluate

    with pytest.raises(SpellmError, match=r"input ids only \(built with --no-teacher"):
        evaluate(tmp_path / "no_model", out)
