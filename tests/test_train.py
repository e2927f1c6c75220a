"""Trainer (spellm_ds/train/loop.py): 2-rank ZeRO-3 on CPU through real launchers, resume, preemption, NaN.

One tiny dataset is built with the real shard builder from the `tiny_llama` teacher (64 training
sequences of 32 tokens in 8 shards, 16 held-out). One uninterrupted 2-rank torchrun run of 14 steps
(micro-batch 2, NaN injected into micro-batches 3 and 4, so exactly one epoch of 16 micro-batches per
rank is drawn) is shared by several assertions: the loss falls, TensorBoard scalars and texts read back,
every sample drawn exactly once, frozen parameters bit-identical to the teacher's weights, trainable ones
changed, keep-latest-k. The other runs are compared with it: kill -9 after step 10 then `resume: auto`
(parameters bit-identical), resume of its step-12 checkpoint at world size 1 (universal checkpoint; the
rest of the epoch drawn exactly once), SIGUSR1 through mpirun (complete checkpoint, exit code 75), and
a run that stops after too many non-finite losses (exit code 3).

Run alone: `.venv/bin/python -m pytest tests/test_train.py -q` (`-m "not dist"` keeps the pure tests).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from spellm_ds.config.run import config_from_dict
from spellm_ds.errors import SpellmError
from spellm_ds.train.callbacks import load_callbacks
from spellm_ds.train.checkpoint import (
    LATEST,
    META_NAME,
    latest_checkpoint,
    prune_checkpoints,
    resume_target,
    tag_for,
)
from spellm_ds.train.loop import EXIT_INTERRUPTED, EXIT_NONFINITE
from spellm_ds.train.schedule import lr_at
from tests import train_helpers as th

STEPS = 14
NAN = "3,4"


# ---------------------------------------------------------------------------------------------------
# Pure parts: schedule, callbacks, checkpoint discovery and pruning


def _cfg(**sched):
    return config_from_dict(
        {
            "run_dir": "r",
            "deepspeed": "d.json",
            "max_steps": 10,
            "model": {"path": "m"},
            "data": {"train": "t", "seq_len": 8},
            "optim": {"lr": 1.0},
            "schedule": sched,
        }
    )


def test_lr_schedule_warmup_then_cosine():
    cfg = _cfg(warmup_steps=2, min_lr=0.0)
    # Hand values: warmup 0.5, 1.0; cosine over the 8 remaining steps: 0.5 * (1 + cos(pi * i / 8)).
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert [lr_at(s, cfg) for s in range(10)] == pytest.approx(expected)
    floor = _cfg(warmup_steps=0, min_lr=0.1)
    assert lr_at(0, floor) == pytest.approx(1.0)
    assert lr_at(10, floor) == pytest.approx(0.1)


def test_callbacks_load_from_module_factory_paths_and_chain_the_loss(monkeypatch, tmp_path):
    monkeypatch.setenv("SPELLM_TEST_NAN_BATCHES", "2")
    monkeypatch.setenv("SPELLM_TRACE_SAMPLES", str(tmp_path / "trace"))
    loaded = load_callbacks([th.FAULT_INJECTION, th.FAULT_INJECTION], rank=3)
    assert [type(cb).__name__ for cb in loaded.callbacks] == ["FaultInjection", "FaultInjection"]
    assert loaded.on_loss(1, torch.tensor(2.0)).item() == 2.0
    assert math.isnan(loaded.on_loss(2, torch.tensor(2.0)).item())
    loaded.on_samples(5, 1, torch.tensor([7, -1]))
    loaded.close()
    assert (tmp_path / "trace" / "rank3.tsv").read_text() == "5\t7,-1\n5\t7,-1\n"
    assert load_callbacks([], rank=0).on_loss(1, torch.tensor(1.0)).item() == 1.0
    with pytest.raises(SpellmError, match=r"callbacks\[0\]='no_such_module:f': cannot import"):
        load_callbacks(["no_such_module:f"], rank=0)
    with pytest.raises(SpellmError, match=r"has no callable 'nothing'"):
        load_callbacks(["fault_injection:nothing"], rank=0)
    with pytest.raises(SpellmError, match=r"returned float, not a spellm_ds.train.callbacks.Callback"):
        load_callbacks(["math:fabs"], rank=0)


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / META_NAME).write_text(json.dumps({"step": step, "world_size": 1}))
    return d


def test_latest_and_prune_keep_complete_newest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for s in (2, 4, 6):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 8, complete=False)  # a save that crashed before it was marked complete
    (tmp_path / LATEST).write_text(tag_for(6))
    assert latest_checkpoint(tmp_path) == tmp_path / tag_for(6)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(removed) == [tag_for(2), tag_for(8)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [tag_for(4), tag_for(6)]
    (tmp_path / LATEST).write_text(tag_for(8))  # names a directory that is not complete
    with pytest.raises(SpellmError, match="not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_resume_policy_never_overwrites_newer_checkpoints(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    cfg = _cfg()
    cfg.run_dir = str(tmp_path / "run")
    assert (
        resume_target(cfg.checkpoint_dir, cfg.checkpoint.resume) is None
    )  # auto, nothing saved yet: fresh start
    for s in (4, 8):
        _fake_ckpt(root, s)
    (root / LATEST).write_text(tag_for(8))
    assert resume_target(cfg.checkpoint_dir, cfg.checkpoint.resume) == root / tag_for(8)
    cfg.checkpoint.resume = str(root / tag_for(4))
    with pytest.raises(SpellmError, match="already holds step_00000008, which this run would overwrite"):
        resume_target(cfg.checkpoint_dir, cfg.checkpoint.resume)
    cfg.checkpoint.resume = "never"
    with pytest.raises(SpellmError, match="would overwrite"):
        resume_target(cfg.checkpoint_dir, cfg.checkpoint.resume)
    cfg.checkpoint.resume = str(root / tag_for(8))
    assert resume_target(cfg.checkpoint_dir, cfg.checkpoint.resume) == root / tag_for(8)


# ---------------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_llama, docs_files):
    """(model dir, train shards, held-out shards) built by the real builder with tiny_llama as teacher."""
    train, held = th.build_tiny_dataset(tiny_llama, docs_files[:8], tmp_path_factory.mktemp("shards"))
    return tiny_llama, train, held


def _config(tmp: Path, tiny_data, name: str, **top) -> Path:
    model, train, held = tiny_data
    return th.write_config(
        tmp / f"{name}.yaml", model=model, train=train, held=held, run_dir=tmp / name, **top
    )


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode} (expected {code}):\n{proc.stdout[-8000:]}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_data):
    """The uninterrupted 2-rank torchrun run every other run is compared with."""
    tmp = tmp_path_factory.mktemp("baseline")
    cfg = _config(tmp, tiny_data, "run")
    proc = th.launch(
        "torchrun", cfg, env={"SPELLM_TEST_NAN_BATCHES": NAN, "SPELLM_TRACE_SAMPLES": str(tmp / "trace")}
    )
    _ok(proc)
    return {"dir": tmp / "run", "trace": tmp / "trace", "model": tiny_data[0], "log": proc.stdout}


@pytest.mark.dist
def test_two_rank_run_learns_and_logs_to_tensorboard(baseline):
    scalars = th.read_scalars(baseline["dir"] / "tensorboard")
    loss = dict(scalars["train/loss"])
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < 0.7 * loss[1], f"loss did not fall: {loss}"
    for tag in (
        "train/char_loss",
        "train/reg_loss",
        "train/char_acc",
        "train/exact_top5",
        "train/any_prefix_top1",
        "train/head_entropy",
        "train/label_not_top1",
        "train/fallback_top1",
        "train/lr",
        "train/grad_norm",
        "throughput/tokens_per_s",
        "time/data_wait_s",
        "time/compute_s",
        "memory/rss_mb",
        "data/corrupt_samples",
    ):
        assert len(scalars[tag]) == STEPS, tag
    assert dict(scalars["train/skipped_nonfinite"])[STEPS] == 2  # the two injected NaN micro-batches
    # 16 micro-batches of 2 sequences on each of 2 ranks were drawn: the whole epoch of 64.
    assert dict(scalars["progress/samples_seen"])[STEPS] == th.TRAIN_SAMPLES
    assert dict(scalars["train/lr"])[1] == pytest.approx(0.01)
    evals = dict(scalars["eval/loss"])
    assert sorted(evals) == [7, 14] and evals[14] < evals[7]
    texts = th.read_texts(baseline["dir"] / "tensorboard")
    assert "max_steps: 14" in texts["config/text_summary"][0]
    sample = texts["eval/samples/text_summary"][0]
    assert "teacher top-1" in sample and "student" in sample
    assert "non-finite loss, micro-batch 3 skipped" in baseline["log"]


@pytest.mark.dist
def test_every_sample_of_the_epoch_drawn_exactly_once(baseline):
    missing, repeated = th.exactly_once(th.read_trace(baseline["trace"]), th.TRAIN_SAMPLES)
    assert missing == [] and repeated == []


@pytest.mark.dist
def test_frozen_bit_identical_trainable_changed_optimizer_state_and_keep_latest_k(baseline):
    from safetensors.torch import load_file

    root = baseline["dir"] / "checkpoints"
    assert (root / LATEST).read_text() == tag_for(STEPS)
    assert sorted(p.name for p in root.glob("step_*")) == [tag_for(12), tag_for(14)]  # keep_latest_k 2
    meta = json.loads((root / tag_for(STEPS) / META_NAME).read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2
    trained = th.checkpoint_params(root, tag_for(STEPS))
    teacher = {}
    for f in sorted(Path(baseline["model"]).glob("*.safetensors")):
        teacher.update(load_file(str(f)))
    n_layers = 6
    trainable = {
        f"model.layers.{i}.mlp.{m}.weight"
        for i in range(n_layers - th.TRAINABLE_LAYERS, n_layers)
        for m in ("gate_proj", "up_proj", "down_proj")
    }
    assert set(trained) == {f"base.{k}" for k in teacher} | {"char_heads.weight"}
    for name, original in teacher.items():
        value = trained[f"base.{name}"]
        if name in trainable:
            assert not torch.equal(value, original), f"{name} did not change"
        else:
            assert torch.equal(value, original), f"frozen {name} changed"
    assert trained["char_heads.weight"].abs().sum() > 0  # the heads start at zero
    # Optimizer state only for trainable parameters: heads 64 x (10 x 105) + 2 MLPs x 3 x 64 x 128.
    moments = 0
    for rank in (0, 1):
        optim = torch.load(
            root / tag_for(STEPS) / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False
        )["optimizer_state_dict"]["optimizer_state_dict"]["state"]
        moments += sum(s["exp_avg"].numel() for s in optim.values())
    assert moments == 64 * 10 * 105 + th.TRAINABLE_LAYERS * 3 * 64 * 128


@pytest.mark.dist
def test_kill9_then_resume_auto_equals_uninterrupted(baseline, tiny_data, tmp_path):
    cfg = _config(tmp_path, tiny_data, "run")
    th.kill9_then_resume(cfg, tmp_path, baseline["dir"] / "checkpoints", NAN, STEPS)
    # TensorBoard: the killed run's steps 9-10 were purged by the resumed writer (one value per step).
    steps = [s for s, _ in th.read_scalars(tmp_path / "run" / "tensorboard")["train/loss"]]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.dist
def test_resume_at_world_size_one_consumes_the_rest_exactly_once(baseline, tiny_data, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(baseline["dir"] / "checkpoints" / tag_for(12), root / tag_for(12))
    (root / LATEST).write_text(tag_for(12))
    cfg = _config(tmp_path, tiny_data, "run")
    env = {"SPELLM_TEST_NAN_BATCHES": NAN, "SPELLM_TRACE_SAMPLES": str(tmp_path / "t")}
    proc = th.launch("single", cfg, env=env)
    _ok(proc)
    assert "(universal)" in proc.stdout and "micro 2 x accum 2 = batch 4" in proc.stdout
    drawn = th.read_trace(baseline["trace"], max_step=12) + th.read_trace(tmp_path / "t")
    missing, repeated = th.exactly_once(drawn, th.TRAIN_SAMPLES)
    assert missing == [] and repeated == []
    # Optimizer state carried over: Adam's step count continues from the 2-rank run (12 + 2 = 14).
    optim = torch.load(
        root / tag_for(STEPS) / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False
    )["optimizer_state_dict"]["optimizer_state_dict"]["state"]
    assert {int(s["step"]) for s in optim.values()} == {STEPS}


@pytest.mark.dist
def test_sigusr1_saves_complete_checkpoint_on_every_rank_and_exits_75(tiny_data, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (Debian openmpi-bin)")
    cfg = _config(tmp_path, tiny_data, "run", checkpoint={"interval": 100, "keep_latest_k": 2})
    trace = tmp_path / "trace"
    code, text = th.usr1_after_two_steps(cfg, trace)
    assert code == EXIT_INTERRUPTED, text[-6000:]
    root = tmp_path / "run" / "checkpoints"
    tag = (root / LATEST).read_text()
    step = json.loads((root / tag / META_NAME).read_text())["step"]
    assert 2 <= step < STEPS
    th.assert_complete_rank_files(root / tag)
    assert f"signal received: saved {tag}" in text
    # Every micro-batch drawn before the save belongs to a step the checkpoint covers.
    assert len(th.read_trace(trace)) == len(th.read_trace(trace, max_step=step)) == step * 4


@pytest.mark.dist
def test_too_many_nonfinite_losses_stop_with_exit_3(tiny_data, tmp_path):
    cfg = _config(tmp_path, tiny_data, "run", max_consecutive_nonfinite=2, eval={"interval": 0})
    # World size 1: grad_accum 2. Step 1 takes micro-batches 1-2; 3 and 4 are NaN in a row: stop.
    proc = th.launch("single", cfg, env={"SPELLM_TEST_NAN_BATCHES": "3,4"})
    _ok(proc, EXIT_NONFINITE)
    assert "2 micro-batches in a row had a non-finite loss" in proc.stdout
    scalars = th.read_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1]  # one good step, then the stop
    assert not (tmp_path / "run" / "checkpoints" / LATEST).exists()


@pytest.mark.dist
def test_warm_start_fits_the_heads_before_step_one_and_mlps_get_their_own_lr(baseline, tiny_data, tmp_path):
    optim = {"lr": 0.001, "mlp_lr_scale": 0.1, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 1.0}
    cfg = _config(
        tmp_path,
        tiny_data,
        "warm",
        max_steps=2,
        optim=optim,
        warm_start={"positions": 2048, "iters": 30, "l2": 1e-3},
        eval={"interval": 0},
    )
    proc = th.launch("torchrun", cfg)
    _ok(proc)
    assert "warm start: char heads fitted on" in proc.stdout
    scalars = th.read_scalars(tmp_path / "warm" / "tensorboard")
    (acc,) = scalars["warm_start/char_acc"]
    (ce,) = scalars["warm_start/char_ce"]
    (positions,) = scalars["warm_start/positions"]
    num_chars = json.loads((tmp_path / "warm" / "checkpoints" / tag_for(2) / "charset.json").read_text())
    ln_c = math.log(len(num_chars["symbols"]))
    assert positions[1] >= 1000 and 0.3 < acc[1] <= 1.0 and ce[1] < 0.7 * ln_c
    # Zero heads score every candidate k·ln|C| (the baseline's first step); fitted heads far less.
    (first_zero,) = [
        v for s, v in th.read_scalars(baseline["dir"] / "tensorboard")["train/char_loss"] if s == 1
    ]
    assert first_zero == pytest.approx(10 * ln_c, rel=1e-4)
    warm_loss = dict(scalars["train/char_loss"])
    # Step 1 scores the fitted heads; step 2 those heads after one optimizer step, which must have
    # started from them (not from the zero heads the optimizer copied at start).
    assert warm_loss[1] < 0.7 * first_zero and warm_loss[2] < 0.7 * first_zero
    heads, mlps = dict(scalars["train/lr_heads"]), dict(scalars["train/lr_mlps"])
    assert sorted(heads) == [1, 2] and all(mlps[s] == pytest.approx(0.1 * heads[s]) for s in heads)
