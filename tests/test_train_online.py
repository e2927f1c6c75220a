"""Online teacher (teacher: online) in the trainer: 2-rank ZeRO-3 on CPU through real launchers.

The tiny dataset of tests/test_train.py is built twice by the real shard builder from the `tiny_llama`
teacher: teacher shards (a plain full-model forward per batch, the expected values) and token-only
shards (`no_teacher`, the same sequences). One uninterrupted 2-rank torchrun run of 14 steps trains
online on the teacher shards (their top-5 ignored) and saves the online teacher's top-5 of every
micro-batch: they must equal the shards' for the same sample indices (ids exactly, log-probs within
float16 rounding), at every step, i.e. also after the trained MLPs moved. The other runs are compared
with it: kill -9 after step 10 then `resume: auto` on the token-only shards (parameters equal to the
uninterrupted run), resume of its step-12 checkpoint at world size 1 (universal checkpoint; the rest of
the epoch drawn exactly once), SIGUSR1 through mpirun (complete checkpoint, exit code 75). Resuming an
online checkpoint as offline is refused.

Run alone: `.venv/bin/python -m pytest tests/test_train_online.py -q`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from spellm_ds.config.run import config_from_dict
from spellm_ds.errors import SpellmError
from spellm_ds.train.checkpoint import LATEST, META_NAME, tag_for
from spellm_ds.train.loop import EXIT_INTERRUPTED
from spellm_ds.train.setup import resume_target_of
from tests import train_helpers as th

STEPS = 14
NAN = "3,4"


@pytest.fixture(scope="module")
def online_data(tmp_path_factory, tiny_llama, docs_files):
    """(model dir, teacher train shards, held-out teacher shards, token-only train shards)."""
    out = tmp_path_factory.mktemp("online_shards")
    train, held = th.build_tiny_dataset(tiny_llama, docs_files[:8], out / "teacher")
    tokens, _ = th.build_tiny_dataset(tiny_llama, docs_files[:8], out / "tokens", no_teacher=True)
    return tiny_llama, train, held, tokens


def _config(tmp: Path, data, name: str, train: Path | None = None, **top) -> Path:
    model, teacher_train, held, _ = data
    return th.write_config(
        tmp / f"{name}.yaml",
        model=model,
        train=train or teacher_train,
        held=held,
        run_dir=tmp / name,
        teacher="online",
        **top,
    )


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode} (expected {code}):\n{proc.stdout[-8000:]}"


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, online_data):
    """The uninterrupted online 2-rank torchrun run every other online run is compared with."""
    tmp = tmp_path_factory.mktemp("online")
    env = {
        "SPELLM_TEST_NAN_BATCHES": NAN,
        "SPELLM_TRACE_SAMPLES": str(tmp / "trace"),
        "SPELLM_TRACE_TEACHER": str(tmp / "teacher"),
    }
    proc = th.launch("torchrun", _config(tmp, online_data, "run"), env=env)
    _ok(proc)
    return {"dir": tmp / "run", "trace": tmp / "trace", "teacher": tmp / "teacher", "log": proc.stdout}


def test_token_only_shards_hold_ids_only_and_offline_training_refuses_them(online_data, tmp_path):
    from spellm_ds.config.preflight import preflight
    from spellm_ds.config.run import load_config
    from spellm_ds.data.shards import read_index

    _, teacher, _, tokens = online_data
    index, ref = read_index(tokens), read_index(teacher)
    assert index["top_k"] == 0 and ref["top_k"] == 5
    assert index["totals"]["samples"] == ref["totals"]["samples"] == th.TRAIN_SAMPLES
    got = th.shard_teacher(tokens)
    from spellm_ds.data import shards

    for entry in ref["shards"]:
        for s in shards.iter_shard(Path(teacher) / entry["name"]):
            ids, lps = got[int(s["__key__"])]
            assert ids.shape == (th.SEQ_LEN, 0) and lps.shape == (th.SEQ_LEN, 0)
    # The same sequences: input ids equal sample by sample.
    tok_ids = {
        int(s["__key__"]): s["input_ids"]
        for e in index["shards"]
        for s in shards.iter_shard(tokens / e["name"])
    }
    for entry in ref["shards"]:
        for s in shards.iter_shard(Path(teacher) / entry["name"]):
            assert np.array_equal(tok_ids[int(s["__key__"])], s["input_ids"])
    cfg_path = _config(tmp_path, online_data, "off", train=tokens)
    cfg = load_config(cfg_path, ["teacher=offline"])
    with pytest.raises(SpellmError, match=r"data.train: .*input ids only.*teacher=online"):
        preflight(cfg, 2)
    preflight(load_config(cfg_path), 2)  # online accepts them


def test_kl_full_with_offline_teacher_is_a_config_error():
    base = {"run_dir": "r", "deepspeed": "d.json", "max_steps": 1, "model": {"path": "m"}}
    base["data"] = {"train": "t", "seq_len": 8}
    with pytest.raises(SpellmError, match=r"loss.regularizer=kl_full .*teacher is offline"):
        config_from_dict({**base, "loss": {"regularizer": "kl_full"}})
    assert (
        config_from_dict({**base, "teacher": "online", "loss": {"regularizer": "kl_full"}}).teacher
        == "online"
    )


def test_resuming_across_teacher_modes_is_refused(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    ck = root / tag_for(4)
    ck.mkdir(parents=True)
    (ck / META_NAME).write_text(json.dumps({"step": 4, "world_size": 2, "teacher": "online"}))
    (root / LATEST).write_text(tag_for(4))
    base = {"run_dir": str(tmp_path / "run"), "deepspeed": "d.json", "max_steps": 8, "model": {"path": "m"}}
    base["data"] = {"train": "t", "seq_len": 8}
    with pytest.raises(SpellmError, match=r"trained with teacher: online, this config has teacher: offline"):
        resume_target_of(config_from_dict(base))
    assert resume_target_of(config_from_dict({**base, "teacher": "online"})) == ck
    (ck / META_NAME).write_text(json.dumps({"step": 4, "world_size": 2}))  # written before the field: offline
    assert resume_target_of(config_from_dict(base)) == ck
    with pytest.raises(SpellmError, match=r"trained with teacher: offline"):
        resume_target_of(config_from_dict({**base, "teacher": "online"}))


@pytest.mark.dist
def test_online_teacher_top5_equals_the_offline_shards_on_two_zero3_ranks(online_run, online_data):
    expected = th.shard_teacher(online_data[1])
    seen = th.read_teacher_trace(online_run["teacher"])
    # 16 micro-batches of 2 sequences on each of 2 ranks: every training sequence, at every step.
    assert sorted(i for i, _, _ in seen) == list(range(th.TRAIN_SAMPLES))
    for index, ids, lps in seen:
        ref_ids, ref_lps = expected[index]
        assert np.array_equal(ids, ref_ids), f"sample {index}: online top-5 ids differ from the shard's"
        ref = ref_lps.astype(np.float32)
        ulp = np.spacing(np.abs(ref_lps)).astype(np.float32)  # one float16 step at each value
        assert (np.abs(lps - ref) <= ulp).all(), f"sample {index}: log-probs beyond float16 rounding"


@pytest.mark.dist
def test_online_run_learns_keeps_the_teacher_copy_frozen_and_draws_each_sample_once(online_run, online_data):
    from safetensors.torch import load_file

    scalars = th.read_scalars(online_run["dir"] / "tensorboard")
    loss = dict(scalars["train/loss"])
    assert sorted(loss) == list(range(1, STEPS + 1)) and loss[STEPS] < 0.7 * loss[1]
    assert "teacher top-1" in th.read_texts(online_run["dir"] / "tensorboard")["eval/samples/text_summary"][0]
    missing, repeated = th.exactly_once(th.read_trace(online_run["trace"]), th.TRAIN_SAMPLES)
    assert missing == [] and repeated == []
    root = online_run["dir"] / "checkpoints"
    assert json.loads((root / tag_for(STEPS) / META_NAME).read_text())["teacher"] == "online"
    trained = th.checkpoint_params(root, tag_for(STEPS))
    teacher = {}
    for f in sorted(Path(online_data[0]).glob("*.safetensors")):
        teacher.update(load_file(str(f)))
    first = 6 - th.TRAINABLE_LAYERS
    for j in range(th.TRAINABLE_LAYERS):
        for m in ("gate_proj", "up_proj", "down_proj"):
            original = teacher[f"model.layers.{first + j}.mlp.{m}.weight"]
            assert torch.equal(trained[f"teacher.mlps.{j}.{m}.weight"], original)  # the frozen copy
            assert not torch.equal(trained[f"base.model.layers.{first + j}.mlp.{m}.weight"], original)


@pytest.mark.dist
def test_online_kill9_then_resume_on_token_only_shards_equals_uninterrupted(
    online_run, online_data, tmp_path
):
    cfg = _config(tmp_path, online_data, "run", train=online_data[3])
    th.kill9_then_resume(cfg, tmp_path, online_run["dir"] / "checkpoints", NAN, STEPS)


@pytest.mark.dist
def test_online_resume_at_world_size_one_consumes_the_rest_exactly_once(online_run, online_data, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(online_run["dir"] / "checkpoints" / tag_for(12), root / tag_for(12))
    (root / LATEST).write_text(tag_for(12))
    cfg = _config(tmp_path, online_data, "run", eval={"interval": 0})
    env = {"SPELLM_TEST_NAN_BATCHES": NAN, "SPELLM_TRACE_SAMPLES": str(tmp_path / "t")}
    proc = th.launch("single", cfg, env=env)
    _ok(proc)
    assert "(universal)" in proc.stdout and "micro 2 x accum 2 = batch 4" in proc.stdout
    drawn = th.read_trace(online_run["trace"], max_step=12) + th.read_trace(tmp_path / "t")
    missing, repeated = th.exactly_once(drawn, th.TRAIN_SAMPLES)
    assert missing == [] and repeated == []
    got = th.checkpoint_params(root, tag_for(STEPS))
    ref = th.checkpoint_params(online_run["dir"] / "checkpoints", tag_for(12))
    for name in (n for n in ref if n.startswith("teacher.")):  # the frozen copy survives the conversion
        assert torch.equal(got[name], ref[name]), name


@pytest.mark.dist
def test_online_sigusr1_saves_complete_checkpoint_and_exits_75(online_data, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (Debian openmpi-bin)")
    cfg = _config(
        tmp_path, online_data, "run", train=online_data[3], checkpoint={"interval": 100, "keep_latest_k": 2}
    )
    trace = tmp_path / "trace"
    code, text = th.usr1_after_two_steps(cfg, trace)
    assert code == EXIT_INTERRUPTED, text[-6000:]
    root = tmp_path / "run" / "checkpoints"
    tag = (root / LATEST).read_text()
    meta = json.loads((root / tag / META_NAME).read_text())
    assert 2 <= meta["step"] < STEPS and meta["teacher"] == "online"
    th.assert_complete_rank_files(root / tag)
    assert len(th.read_trace(trace)) == len(th.read_trace(trace, max_step=meta["step"])) == meta["step"] * 4
