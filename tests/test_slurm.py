"""The real `slurm/*.sh` scripts submitted to a real one-node SLURM started on localhost for the session.

Covers: shellcheck of every script; the smoke job (rank mapping + all-reduce over 2 tasks);
`build_shards.sh` as a 2-task array builds a dataset byte-identical to a single-process build;
`distill_70b.sh` with the tiny CPU config on 1 node x 2 tasks trains and checkpoints, then `export.sh`
exports it (2 writer tasks) and `eval.sh` evaluates the export; a USR1 mid-run (as
`--signal=B:USR1@...` sends it) checkpoints, requeues the job, and the requeued job finishes with the
same parameters and the same consumed samples as the uninterrupted run.
Scripts are submitted from the repository as they are (never copies), with environment overrides and
sbatch options for the tiny CPU case. Without root or the SLURM/munge packages the SLURM tests skip with
the reason (see tests/slurm_cluster.py).

Run alone: .venv/bin/python -m pytest tests/test_slurm.py -q -rs
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import BUILD_OPTIONS, REPO_ROOT, free_port
from slurm_cluster import SlurmCluster, SlurmStartError, unavailable

SLURM_DIR = REPO_ROOT / "slurm"
SCRIPTS = ("distill_70b.sh", "build_shards.sh", "export.sh", "eval.sh", "smoke.sh")
# sbatch options that turn the GPU headers into the tiny CPU case on the test node (2 CPUs, no GPUs)
CPU_JOB = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=01:00:00")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM on localhost for the whole session; skips with the reason where it cannot run."""
    reason = unavailable()
    if reason:
        pytest.skip(f"local SLURM unavailable: {reason}")
    # daemon state lives outside pytest's numbered temp dirs, which a concurrent pytest run may prune
    workdir = Path(tempfile.mkdtemp(prefix="spellm-slurm-"))
    cluster = SlurmCluster(workdir)
    try:
        cluster.start()
    except SlurmStartError as exc:
        pytest.fail(f"local SLURM did not start: {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _job_env(**extra: str) -> dict[str, str]:
    """Environment overrides every job gets: this checkout, its venv, CPU ranks, a free rendezvous port."""
    return {
        "REPO": str(REPO_ROOT),
        "VENV": str(REPO_ROOT / ".venv"),
        "PYTHONPATH": str(REPO_ROOT),
        "DS_ACCELERATOR": "cpu",
        "MASTER_PORT": str(free_port()),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no output file {path})"


def test_scripts_are_shellcheck_clean():
    """Every launcher passes shellcheck (skips where shellcheck is not installed)."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = [str(SLURM_DIR / s) for s in SCRIPTS if (SLURM_DIR / s).exists()]
    out = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_requeue_exit_code_matches_trainer():
    """distill_70b.sh requeues on exactly the trainer's documented "interrupted" exit code."""
    train = pytest.importorskip("spellm_ds.train")
    text = (SLURM_DIR / "distill_70b.sh").read_text()
    m = re.search(r"^EXIT_INTERRUPTED=(\d+)", text, re.M)
    assert m, "distill_70b.sh defines no EXIT_INTERRUPTED"
    assert int(m.group(1)) == train.EXIT_INTERRUPTED


@pytest.mark.slurm
def test_smoke_job_maps_ranks_and_all_reduces(slurm_cluster, tmp_path):
    """smoke.sh on 1 node x 2 tasks: ranks 0 and 1 from SLURM variables, gloo all-reduce gives 1+2."""
    env = _job_env()
    del env["MASTER_PORT"]  # the script derives it from the job id
    job = slurm_cluster.sbatch(
        SLURM_DIR / "smoke.sh", *CPU_JOB, f"--output={tmp_path}/%x-%j.out", env=env, cwd=REPO_ROOT
    )
    (rec,) = slurm_cluster.wait(job, timeout=120)
    log = _read(tmp_path / f"spellm-smoke-{job}.out")
    assert (rec.state, rec.exit_code) == ("COMPLETED", 0), log
    ranks = sorted(re.findall(r"\[smoke\] rank (\d)/2 local (\d)/2 launcher srun .* backend gloo", log))
    assert ranks == [("0", "0"), ("1", "1")], log
    assert "all_reduce sum 3, expected 3: OK" in log, log
    assert f"rendezvous {slurm_cluster.node}:{20000 + int(job) % 40000}" in log, log


TRAIN_STEPS = 6


@pytest.mark.slurm
def test_build_shards_array_matches_single_process(
    slurm_cluster, tmp_path, tiny_llama, build_inputs, teacher_dataset
):
    """build_shards.sh as a 2-task array job writes the same bytes as one plain process."""
    out = tmp_path / "array"
    job = slurm_cluster.sbatch(
        SLURM_DIR / "build_shards.sh",
        "--array=0-1",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%A_%a.out",
        env=_job_env(
            TEACHER=str(tiny_llama),
            INPUT=" ".join(build_inputs),
            OUTPUT=str(out),
            SEQ_LEN=BUILD_OPTIONS[1],
            SAMPLES_PER_SHARD=BUILD_OPTIONS[3],
            MAX_SAMPLES=BUILD_OPTIONS[5],
            OMP_NUM_THREADS="1",
        ),
        cwd=REPO_ROOT,
    )
    tasks = slurm_cluster.wait(job, timeout=300)
    logs = "\n".join(_read(p) for p in sorted(tmp_path.glob("*.out")))
    assert sorted(t.job_id for t in tasks) == [f"{job}_0", f"{job}_1"], logs
    assert all((t.state, t.exit_code) == ("COMPLETED", 0) for t in tasks), logs
    # both array tasks built shards (tasks split the work)
    assert len(re.findall(r"built [1-9]\d* shards", logs)) == 2, logs
    reference = {
        p.name: p.read_bytes() for p in teacher_dataset.iterdir() if p.name.startswith(("shard-", "index"))
    }
    built = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("shard-", "index"))}
    assert sorted(built) == sorted(reference) and any(n.endswith(".tar") for n in built)
    assert [n for n in reference if built[n] != reference[n]] == []


def _train_overrides(run_dir: Path, tiny_llama: Path, dataset: Path) -> str:
    """EXTRA for distill_70b.sh: the tiny CPU recipe pointed at the test model, shards and run dir."""
    return " ".join(
        [
            f"run_dir={run_dir}",
            f"model.path={tiny_llama}",
            f"data.train={dataset}",
            "data.eval=null",
            "data.seq_len=64",
            "data.num_workers=0",
            "batch.micro=4",
            "batch.train=8",
            f"max_steps={TRAIN_STEPS}",
            "checkpoint.interval=3",
            "eval.interval=0",
            "log_interval=1",
            "schedule.warmup_steps=2",
        ]
    )


def _distill(
    cluster, tmp: Path, name: str, tiny_llama: Path, dataset: Path, **env: str
) -> tuple[str, Path, Path]:
    """Submit distill_70b.sh for the tiny CPU case; return (job id, run dir, log path)."""
    run_dir, trace = tmp / name, tmp / f"{name}-trace"
    trace.mkdir(parents=True)
    job = cluster.sbatch(
        SLURM_DIR / "distill_70b.sh",
        *CPU_JOB,
        f"--job-name={name}",
        f"--output={tmp}/%x-%j.out",
        env=_job_env(
            CONFIG="configs/tiny_cpu.yaml",
            EXTRA=_train_overrides(run_dir, tiny_llama, dataset),
            SPELLM_TRACE_SAMPLES=str(trace),
            OMP_NUM_THREADS="1",
            **env,
        ),
        cwd=REPO_ROOT,
    )
    return job, run_dir, tmp / f"{name}-{job}.out"


def _trainable_fp32(checkpoints: Path, tag: str) -> dict:
    """The fp32 master copy of every trained tensor, consolidated by DeepSpeed's own reader."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    return {k: v for k, v in state.items() if k.startswith("char_heads") or ".mlp." in k}


def _trace(trace_dir: Path) -> dict[str, list[str]]:
    """Per rank: the "step<TAB>sample indices" lines the trainer appended, in order."""
    return {p.name: p.read_text().splitlines() for p in sorted(trace_dir.glob("rank*.tsv"))}


@pytest.fixture(scope="module")
def uninterrupted_run(slurm_cluster, tmp_path_factory, tiny_llama, teacher_dataset):
    """distill_70b.sh on 1 node x 2 tasks, never interrupted: (job record, run dir, log text, trace dir)."""
    tmp = tmp_path_factory.mktemp("distill")
    job, run_dir, log_path = _distill(
        slurm_cluster, tmp, "plain", tiny_llama, teacher_dataset, LOG_VERSIONS="1"
    )
    (rec,) = slurm_cluster.wait(job, timeout=300)
    return rec, run_dir, _read(log_path), tmp / "plain-trace"


@pytest.mark.slurm
def test_distill_trains_checkpoints_then_export_and_eval(
    slurm_cluster, uninterrupted_run, tmp_path, teacher_dataset
):
    """distill_70b.sh trains 2 ranks to max_steps with checkpoints; export.sh exports, eval.sh evaluates."""
    rec, run_dir, log, _ = uninterrupted_run
    assert (rec.state, rec.exit_code, rec.restarts) == ("COMPLETED", 0, 0), log
    assert "PyTorch version" in log and "deepspeed==" in log, "versions not logged"
    assert f"step {TRAIN_STEPS}:" in log and "world size 2" in log, log
    checkpoints = run_dir / "checkpoints"
    final = f"step_{TRAIN_STEPS:08d}"
    assert (checkpoints / "latest").read_text().strip() == final
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000003", final]

    out = tmp_path / "export"
    job = slurm_cluster.sbatch(
        SLURM_DIR / "export.sh",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        env=_job_env(CHECKPOINT=str(checkpoints), OUTPUT=str(out)),
        cwd=REPO_ROOT,
    )
    (exp,) = slurm_cluster.wait(job, timeout=240)
    exp_log = _read(tmp_path / f"spellm-export-{job}.out")
    assert (exp.state, exp.exit_code) == ("COMPLETED", 0), exp_log
    spellm_cfg = json.loads((out / "spellm_config.json").read_text())
    assert json.dumps(spellm_cfg).count(final) >= 1, spellm_cfg
    from safetensors.torch import load_file

    heads = load_file(str(out / "char_heads.safetensors"))["weight"]
    trained = _trainable_fp32(checkpoints, final)
    (head_key,) = [k for k in trained if k.startswith("char_heads")]
    assert torch.equal(heads, trained[head_key])

    report = tmp_path / "eval.json"
    job = slurm_cluster.sbatch(
        SLURM_DIR / "eval.sh",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        env=_job_env(
            MODEL=str(out),
            SHARDS=str(teacher_dataset),
            JSON=str(report),
            DEVICE="cpu",
            EXTRA="--max-samples 8",
        ),
        cwd=REPO_ROOT,
    )
    (ev,) = slurm_cluster.wait(job, timeout=240)
    ev_log = _read(tmp_path / f"spellm-eval-{job}.out")
    assert (ev.state, ev.exit_code) == ("COMPLETED", 0), ev_log
    metrics = json.loads(report.read_text())
    for key in ("exact_top1", "exact_top5", "exact_or_prefix_top5", "threshold", "fallback_rate"):
        assert key in metrics, key


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_finishes_like_uninterrupted(
    slurm_cluster, uninterrupted_run, tmp_path, tiny_llama, teacher_dataset
):
    """USR1 to the batch shell mid-run: checkpoint, exit 75, `scontrol requeue`, resume, same end state."""
    ref_rec, ref_dir, ref_log, ref_trace = uninterrupted_run
    assert ref_rec.state == "COMPLETED", ref_log
    job, run_dir, log_path = _distill(
        slurm_cluster,
        tmp_path,
        "preempt",
        tiny_llama,
        teacher_dataset,
        LOG_VERSIONS="0",
        SPELLM_TEST_STEP_SLEEP="1",
    )
    # once rank 0 has drawn the batches of step 2, send what `--signal=B:USR1@...` sends near the limit
    rank0 = tmp_path / "preempt-trace" / "rank0.tsv"
    slurm_cluster.wait(
        job, timeout=240, until=lambda _: rank0.exists() and "\n2\t" in "\n" + rank0.read_text()
    )
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    (rec,) = slurm_cluster.wait(job, timeout=300)
    log = _read(log_path)
    assert (rec.state, rec.exit_code, rec.restarts) == ("COMPLETED", 0, 1), log
    assert "received SIGUSR1" in log and "requeueing job" in log, log
    assert f"job {job} restart 1" in log, log
    assert "training step exited with code 75" in log and "training step exited with code 0" in log, log
    # resumed from the checkpoint written at the interruption, not from scratch
    assert re.search(r"resum\w* .*step_0000000[2-5]", log, re.I), log

    final = f"step_{TRAIN_STEPS:08d}"
    ref_meta = json.loads((ref_dir / "checkpoints" / final / "spellm_meta.json").read_text())
    meta = json.loads((run_dir / "checkpoints" / final / "spellm_meta.json").read_text())
    for key in ("step", "samples_seen", "tokens_seen"):
        assert meta[key] == ref_meta[key], key
    assert _trace(tmp_path / "preempt-trace") == _trace(ref_trace)
    ref_params = _trainable_fp32(ref_dir / "checkpoints", final)
    params = _trainable_fp32(run_dir / "checkpoints", final)
    assert params.keys() == ref_params.keys() and len(params) > 1
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slurm
def test_real_failure_is_not_requeued(slurm_cluster, tmp_path, tiny_llama, teacher_dataset):
    """A trainer error (bad config: exit 2) fails the job once: no requeue, no restart."""
    job, _, log_path = _distill(
        slurm_cluster,
        tmp_path,
        "broken",
        tiny_llama,
        teacher_dataset,
        LOG_VERSIONS="0",
        RESUME="no-such-checkpoint",
    )
    (rec,) = slurm_cluster.wait(job, timeout=180)
    log = _read(log_path)
    assert (rec.state, rec.exit_code, rec.restarts) == ("FAILED", 2, 0), log
    assert "training step exited with code 2" in log and "requeue" not in log, log
