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

import pytest
import slurm_jobs as jobs
from conftest import REPO_ROOT
from slurm_cluster import SlurmCluster, unavailable

SCRIPTS = ("distill_70b.sh", "build_shards.sh", "export.sh", "eval.sh", "smoke.sh")
# sbatch options that turn the GPU headers into the tiny CPU case on the test node (2 CPUs, no GPUs)
CPU_JOB = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=01:00:00")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM on localhost for the whole session; skips with the reason where it cannot run."""
    yield from jobs.cluster_session("local SLURM", unavailable(), "spellm-slurm-", SlurmCluster)


def test_scripts_are_shellcheck_clean():
    """Every launcher passes shellcheck (skips where shellcheck is not installed)."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = [str(jobs.SLURM_DIR / s) for s in SCRIPTS if (jobs.SLURM_DIR / s).exists()]
    out = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_requeue_exit_code_matches_trainer():
    """distill_70b.sh requeues on exactly the trainer's documented "interrupted" exit code."""
    train = pytest.importorskip("spellm_ds.train.loop")
    text = (jobs.SLURM_DIR / "distill_70b.sh").read_text()
    m = re.search(r"^EXIT_INTERRUPTED=(\d+)", text, re.M)
    assert m, "distill_70b.sh defines no EXIT_INTERRUPTED"
    assert int(m.group(1)) == train.EXIT_INTERRUPTED


@pytest.mark.slurm
def test_smoke_job_maps_ranks_and_all_reduces(slurm_cluster, tmp_path):
    """smoke.sh on 1 node x 2 tasks: ranks 0 and 1 from SLURM variables, gloo all-reduce gives 1+2."""
    env = jobs.job_env()
    del env["MASTER_PORT"]  # the script derives it from the job id
    job = slurm_cluster.sbatch(
        jobs.SLURM_DIR / "smoke.sh", *CPU_JOB, f"--output={tmp_path}/%x-%j.out", env=env, cwd=REPO_ROOT
    )
    (rec,) = slurm_cluster.wait(job, timeout=120)
    log = jobs.read_log(tmp_path / f"spellm-smoke-{job}.out")
    assert (rec.state, rec.exit_code) == ("COMPLETED", 0), log
    ranks = sorted(re.findall(r"\[smoke\] rank (\d)/2 local (\d)/2 launcher srun .* backend gloo", log))
    assert ranks == [("0", "0"), ("1", "1")], log
    assert "all_reduce sum 3, expected 3: OK" in log, log
    assert f"rendezvous {slurm_cluster.node}:{20000 + int(job) % 40000}" in log, log


@pytest.mark.slurm
def test_build_shards_array_matches_single_process(
    slurm_cluster, tmp_path, tiny_llama, build_inputs, teacher_dataset
):
    """build_shards.sh as a 2-task array job writes the same bytes as one plain process."""
    _, logs, out = jobs.build_shards_array(slurm_cluster, tmp_path, tiny_llama, build_inputs, cpus_per_task=1)
    # both array tasks built shards (tasks split the work)
    assert len(re.findall(r"built [1-9]\d* shards", logs)) == 2, logs
    jobs.assert_same_shards(out, teacher_dataset)


@pytest.fixture(scope="module")
def uninterrupted_run(slurm_cluster, tmp_path_factory, tiny_llama, teacher_dataset):
    """distill_70b.sh on 1 node x 2 tasks, never interrupted: (job record, run dir, log text, trace dir)."""
    tmp = tmp_path_factory.mktemp("distill")
    submitted = jobs.submit_distill(
        slurm_cluster, tmp, "plain", tiny_llama, teacher_dataset, CPU_JOB, LOG_VERSIONS="1"
    )
    return jobs.finished_run(slurm_cluster, submitted, timeout=300)


@pytest.mark.slurm
def test_distill_trains_checkpoints_then_export_and_eval(
    slurm_cluster, uninterrupted_run, tmp_path, teacher_dataset
):
    """distill_70b.sh trains 2 ranks to max_steps with checkpoints; export.sh exports, eval.sh evaluates."""
    rec, run_dir, log, _ = uninterrupted_run
    assert (rec.state, rec.exit_code, rec.restarts) == ("COMPLETED", 0, 0), log
    assert "PyTorch version" in log and "deepspeed==" in log, "versions not logged"
    assert f"step {jobs.TRAIN_STEPS}:" in log and "world size 2" in log, log
    checkpoints = jobs.assert_checkpoints(run_dir)

    out = jobs.export(slurm_cluster, tmp_path, checkpoints, ntasks=2)
    spellm_cfg = json.loads((out / "spellm_config.json").read_text())
    assert json.dumps(spellm_cfg).count(jobs.FINAL) >= 1, spellm_cfg
    jobs.assert_exported_heads(out, checkpoints)

    report = tmp_path / "eval.json"
    job = slurm_cluster.sbatch(
        jobs.SLURM_DIR / "eval.sh",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        env=jobs.job_env(
            MODEL=str(out),
            SHARDS=str(teacher_dataset),
            JSON=str(report),
            DEVICE="cpu",
            EXTRA="--max-samples 8",
        ),
        cwd=REPO_ROOT,
    )
    (ev,) = slurm_cluster.wait(job, timeout=240)
    ev_log = jobs.read_log(tmp_path / f"spellm-eval-{job}.out")
    assert (ev.state, ev.exit_code) == ("COMPLETED", 0), ev_log
    metrics = json.loads(report.read_text())
    for key in ("exact_top1", "exact_top5", "exact_or_prefix_top5", "threshold", "fallback_rate"):
        assert key in metrics, key


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_finishes_like_uninterrupted(
    slurm_cluster, uninterrupted_run, tmp_path, tiny_llama, teacher_dataset
):
    """USR1 to the batch shell mid-run: checkpoint, exit 75, `scontrol requeue`, resume, same end state."""
    ref_dir, ref_trace = jobs.completed(uninterrupted_run)
    job, run_dir, log_path = jobs.submit_distill(
        slurm_cluster,
        tmp_path,
        "preempt",
        tiny_llama,
        teacher_dataset,
        CPU_JOB,
        LOG_VERSIONS="0",
        SPELLM_TEST_STEP_SLEEP="1",
    )
    # once rank 0 has drawn the batches of step 2, send what `--signal=B:USR1@...` sends near the limit
    slurm_cluster.wait(job, timeout=240, until=jobs.until_step(tmp_path / "preempt-trace" / "rank0.tsv", 2))
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    (rec,) = slurm_cluster.wait(job, timeout=300)
    log = jobs.read_log(log_path)
    assert (rec.state, rec.exit_code, rec.restarts) == ("COMPLETED", 0, 1), log
    assert "received SIGUSR1" in log and "requeueing job" in log, log
    assert f"job {job} restart 1" in log, log
    assert "training step exited with code 75" in log and "training step exited with code 0" in log, log
    # resumed from the checkpoint written at the interruption, not from scratch
    assert re.search(r"resum\w* .*step_0000000[2-5]", log, re.I), log

    jobs.assert_finished_like(
        run_dir, tmp_path / "preempt-trace", ref_dir, ref_trace, ("step", "samples_seen", "tokens_seen")
    )


@pytest.mark.slurm
def test_real_failure_is_not_requeued(slurm_cluster, tmp_path, tiny_llama, teacher_dataset):
    """A trainer error (bad config: exit 2) fails the job once: no requeue, no restart."""
    job, _, log_path = jobs.submit_distill(
        slurm_cluster,
        tmp_path,
        "broken",
        tiny_llama,
        teacher_dataset,
        CPU_JOB,
        LOG_VERSIONS="0",
        RESUME="no-such-checkpoint",
    )
    (rec,) = slurm_cluster.wait(job, timeout=180)
    log = jobs.read_log(log_path)
    assert (rec.state, rec.exit_code, rec.restarts) == ("FAILED", 2, 0), log
    assert "training step exited with code 2" in log and "requeue" not in log, log
