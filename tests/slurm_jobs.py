"""Submitting the real `slurm/*.sh` scripts and checking what their jobs left behind, for the one-node
(tests/test_slurm.py) and the two-node (tests/test_slurm_multinode.py) SLURM tests.

Scripts are submitted from the repository as they are (never copies), with environment overrides for
the tiny CPU case; each test file passes the sbatch options that fit its cluster. Not a test file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import BUILD_OPTIONS, REPO_ROOT, free_port
from slurm_cluster import Job, SlurmCluster, SlurmStartError

SLURM_DIR = REPO_ROOT / "slurm"
TRAIN_STEPS = 6
FINAL = f"step_{TRAIN_STEPS:08d}"  # the checkpoint tag at max_steps


def cluster_session(
    what: str, reason: str | None, prefix: str, make: Callable[[Path], SlurmCluster]
) -> Iterator[SlurmCluster]:
    """Body of a session cluster fixture: skip with `reason`, else start `make(workdir)`; stop it after."""
    if reason:
        pytest.skip(f"{what} unavailable: {reason}")
    # daemon state lives outside pytest's numbered temp dirs, which a concurrent pytest run may prune
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = make(workdir)
    try:
        cluster.start()
    except SlurmStartError as exc:
        pytest.fail(f"{what} did not start: {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def job_env(**extra: str) -> dict[str, str]:
    """Environment overrides every job gets: this checkout (and tests/, for the fault-injection callback),
    its venv, CPU ranks, a free rendezvous port."""
    return {
        "REPO": str(REPO_ROOT),
        "VENV": str(REPO_ROOT / ".venv"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]),  # + fault injection
        "DS_ACCELERATOR": "cpu",
        "MASTER_PORT": str(free_port()),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no output file {path})"


def build_shards_array(
    cluster: SlurmCluster, tmp_path: Path, tiny_llama: Path, build_inputs: list[str], cpus_per_task: int
) -> tuple[list[Job], str, Path]:
    """build_shards.sh as a 2-task array, both tasks completed: (array tasks, their logs, output dir)."""
    out = tmp_path / "array"
    job = cluster.sbatch(
        SLURM_DIR / "build_shards.sh",
        "--array=0-1",
        f"--cpus-per-task={cpus_per_task}",
        f"--output={tmp_path}/%x-%A_%a.out",
        env=job_env(
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
    tasks = cluster.wait(job, timeout=300)
    logs = "\n".join(read_log(p) for p in sorted(tmp_path.glob("*.out")))
    assert sorted(t.job_id for t in tasks) == [f"{job}_0", f"{job}_1"], logs
    assert all((t.state, t.exit_code) == ("COMPLETED", 0) for t in tasks), logs
    return tasks, logs, out


def assert_same_shards(built_dir: Path, reference_dir: Path) -> None:
    """`built_dir` holds the shards and index of `reference_dir`, byte for byte."""

    def shards(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.startswith(("shard-", "index"))}

    reference, built = shards(reference_dir), shards(built_dir)
    assert sorted(built) == sorted(reference) and any(n.endswith(".tar") for n in built)
    assert [n for n in reference if built[n] != reference[n]] == []


def train_overrides(run_dir: Path, tiny_llama: Path, dataset: Path, changes: dict | None = None) -> str:
    """EXTRA for distill_70b.sh: the tiny CPU recipe pointed at the test model, shards and run dir, with
    the tests' fault-injection callback registered.

    `changes` replaces recipe values in place and appends new keys at the end."""
    values = {
        "run_dir": run_dir,
        "model.path": tiny_llama,
        "data.train": dataset,
        "data.eval": "null",
        "data.seq_len": 64,
        "data.num_workers": 0,
        "batch.micro": 4,
        "batch.train": 8,
        "max_steps": TRAIN_STEPS,
        "checkpoint.interval": 3,
        "eval.interval": 0,
        "log_interval": 1,
        "schedule.warmup_steps": 2,
        "warm_start.positions": 0,
        "callbacks": "[fault_injection:from_env]",  # tests/fault_injection.py: SPELLM_TEST_* / SPELLM_TRACE_*
        **(changes or {}),
    }
    return " ".join(f"{key}={value}" for key, value in values.items())


def submit_distill(
    cluster: SlurmCluster,
    tmp: Path,
    name: str,
    tiny_llama: Path,
    dataset: Path,
    options: tuple[str, ...],
    changes: dict | None = None,
    **env: str,
) -> tuple[str, Path, Path]:
    """Submit distill_70b.sh with `options` for the tiny CPU recipe; return (job id, run dir, log path).

    Ranks append their sample indices to `<tmp>/<name>-trace`; `env` overrides OMP_NUM_THREADS=1."""
    run_dir, trace_dir = tmp / name, tmp / f"{name}-trace"
    trace_dir.mkdir(parents=True)
    job = cluster.sbatch(
        SLURM_DIR / "distill_70b.sh",
        *options,
        f"--job-name={name}",
        f"--output={tmp}/%x-%j.out",
        env=job_env(
            CONFIG="configs/tiny_cpu.yaml",
            EXTRA=train_overrides(run_dir, tiny_llama, dataset, changes),
            SPELLM_TRACE_SAMPLES=str(trace_dir),
            **{"OMP_NUM_THREADS": "1", **env},
        ),
        cwd=REPO_ROOT,
    )
    return job, run_dir, tmp / f"{name}-{job}.out"


def finished_run(
    cluster: SlurmCluster, submitted: tuple[str, Path, Path], timeout: float
) -> tuple[Job, Path, str, Path]:
    """Wait for a `submit_distill` job to end: (job record, run dir, log text, trace dir)."""
    job, run_dir, log_path = submitted
    (rec,) = cluster.wait(job, timeout=timeout)
    return rec, run_dir, read_log(log_path), run_dir.with_name(f"{run_dir.name}-trace")


def completed(run: tuple[Job, Path, str, Path]) -> tuple[Path, Path]:
    """(run dir, trace dir) of a `finished_run` that must have completed (the reference of a comparison)."""
    rec, run_dir, log, trace_dir = run
    assert rec.state == "COMPLETED", log
    return run_dir, trace_dir


def until_step(trace_file: Path, step: int):
    """A `wait` condition: `trace_file` shows a micro-batch of optimizer step `step`."""
    return lambda _: trace_file.exists() and f"\n{step}\t" in "\n" + trace_file.read_text()


def assert_checkpoints(run_dir: Path) -> Path:
    """The run saved at step 3 and at max_steps, and `latest` names the last; return its checkpoints dir."""
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == FINAL
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000003", FINAL]
    return checkpoints


def export(cluster: SlurmCluster, tmp_path: Path, checkpoints: Path, ntasks: int) -> Path:
    """export.sh with `ntasks` writer tasks on one node, completed; return the export directory."""
    out = tmp_path / "export"
    job = cluster.sbatch(
        SLURM_DIR / "export.sh",
        f"--ntasks-per-node={ntasks}",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        env=job_env(CHECKPOINT=str(checkpoints), OUTPUT=str(out)),
        cwd=REPO_ROOT,
    )
    (exp,) = cluster.wait(job, timeout=240)
    assert (exp.state, exp.exit_code) == ("COMPLETED", 0), read_log(tmp_path / f"spellm-export-{job}.out")
    return out


def trainable_fp32(checkpoints: Path, tag: str) -> dict:
    """The fp32 master copy of every trained tensor, consolidated by DeepSpeed's own reader."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    return {k: v for k, v in state.items() if k.startswith("char_heads") or ".mlp." in k}


def head_key(trained: dict) -> str:
    """The one character-head tensor among `trainable_fp32`'s."""
    (key,) = [k for k in trained if k.startswith("char_heads")]
    return key


def assert_exported_heads(out: Path, checkpoints: Path) -> None:
    """The exported character heads are the final checkpoint's fp32 master weights exactly."""
    from safetensors.torch import load_file

    heads = load_file(str(out / "char_heads.safetensors"))["weight"]
    trained = trainable_fp32(checkpoints, FINAL)
    assert torch.equal(heads, trained[head_key(trained)])


def trace(trace_dir: Path) -> dict[str, list[str]]:
    """Per rank: the "step<TAB>sample indices" lines the trainer appended, in order."""
    return {p.name: p.read_text().splitlines() for p in sorted(trace_dir.glob("rank*.tsv"))}


def assert_same_counters(run_dir: Path, ref_dir: Path, keys: tuple[str, ...]) -> tuple[dict, dict]:
    """The final checkpoints' `keys` agree; return (meta, reference meta)."""
    meta = json.loads((run_dir / "checkpoints" / FINAL / "spellm_meta.json").read_text())
    ref_meta = json.loads((ref_dir / "checkpoints" / FINAL / "spellm_meta.json").read_text())
    for key in keys:
        assert meta[key] == ref_meta[key], key
    return meta, ref_meta


def assert_finished_like(
    run_dir: Path, trace_dir: Path, ref_dir: Path, ref_trace: Path, keys: tuple[str, ...]
) -> None:
    """An interrupted run ended as the uninterrupted one: counters, samples per rank, trained parameters."""
    assert_same_counters(run_dir, ref_dir, keys)
    assert trace(trace_dir) == trace(ref_trace)
    ref_params = trainable_fp32(ref_dir / "checkpoints", FINAL)
    params = trainable_fp32(run_dir / "checkpoints", FINAL)
    assert params.keys() == ref_params.keys() and len(params) > 1
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=0, atol=1e-6, msg=name)
