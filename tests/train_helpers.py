"""Helpers for the trainer tests: a tiny teacher dataset built by the real shard builder, run configs,
launching `spellm-ds train` through real launchers with hard timeouts, and reading back what a run left
behind (TensorBoard scalars, sample traces, consolidated checkpoint parameters).

Not a test file; `tests/test_train.py` uses it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO_ROOT, free_port

PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
SEQ_LEN = 32
TRAIN_SAMPLES = 64  # 8 shards of 8: each of 2 ranks gets 4 shards = 16 micro-batches of 2
EVAL_SAMPLES = 16
TRAINABLE_LAYERS = 2
# The callback every test config registers (tests/fault_injection.py; tests/ is on the ranks' PYTHONPATH)
FAULT_INJECTION = "fault_injection:from_env"
# The ranks' PYTHONPATH: this checkout, and tests/ for the fault-injection callback
RANK_PYTHONPATH = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])


def build_tiny_dataset(
    model_dir: Path, docs: list[Path], out: Path, no_teacher: bool = False
) -> tuple[Path, Path]:
    """Build train and held-out shards from `model_dir` as teacher with `spellm_ds.data.build` (in-process).

    `no_teacher`: token-only shards (the same sequences, no teacher top-k)."""
    from spellm_ds.data.build import BuildConfig, build_shards

    half = len(docs) // 2
    train, held = out / "train", out / "eval"
    for inputs, dest, count in ((docs[:half], train, TRAIN_SAMPLES), (docs[half:], held, EVAL_SAMPLES)):
        build_shards(
            BuildConfig(
                teacher=str(model_dir),
                inputs=[str(f) for f in inputs],
                output=str(dest),
                seq_len=SEQ_LEN,
                samples_per_shard=8,
                batch_size=8,
                max_samples=count,
                progress=False,
                no_teacher=no_teacher,
            ),
            rank=0,
            world_size=1,
        )
    return train, held


def write_config(path: Path, *, model: Path, train: Path, held: Path, run_dir: Path, **top: Any) -> Path:
    """Write a tiny run config (2 ranks x micro 2, float32, ZeRO-3 on CPU) with top-level overrides.

    The config registers the tests' fault injection and tracing (`tests/fault_injection.py`), which the
    SPELLM_TEST_* / SPELLM_TRACE_* variables of `launch` and `start` drive."""
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "deepspeed": str(REPO_ROOT / "ds_configs" / "zero3_cpu.json"),
        "max_steps": 14,
        "seed": 0,
        "log_interval": 1,
        "max_consecutive_nonfinite": 3,
        "model": {"path": str(model), "trainable_layers": TRAINABLE_LAYERS, "k": 10, "dtype": "float32"},
        "data": {"train": str(train), "eval": str(held), "seq_len": SEQ_LEN, "num_workers": 0},
        "batch": {"micro": 2, "grad_accum": None, "train": 4},
        "optim": {"lr": 0.01, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"warmup_steps": 0, "min_lr": 0.0},
        "loss": {"selection": "lowest", "regularizer": "kl6", "reg_weight": 0.1, "reg_chunk": 32},
        "warm_start": {"positions": 0},  # zero heads at step 0: these runs test mechanics, not fidelity
        "eval": {"interval": 7, "batches": 2, "text_samples": 1},
        "checkpoint": {"interval": 4, "keep_latest_k": 2, "resume": "auto"},
        "callbacks": [FAULT_INJECTION],
    }
    cfg.update(top)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def base_env(**extra: str) -> dict[str, str]:
    """Environment for a launched run: CPU accelerator, one thread per rank, no inherited rank variables,
    tests/ importable (the fault-injection callback)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPELLM_TEST_", "SPELLM_TRACE", "OMPI_COMM_WORLD", "PMI_"))
        and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    }
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=RANK_PYTHONPATH,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.update(extra)
    return env


_MPI_FORWARD = ("MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "OMP_NUM_THREADS", "PYTHONPATH",
                "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # fmt: skip


def command(
    launcher: str, config: Path, overrides: list[str], env: dict[str, str], nproc: int = 2
) -> list[str]:
    """The argv that runs `spellm-ds train` under `launcher` (torchrun | mpirun | single)."""
    train = ["-m", "spellm_ds.cli", "train", "--config", str(config), *overrides]
    if launcher == "torchrun":
        port = env["MASTER_PORT"]
        return [
            TORCHRUN,
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *train,
        ]
    if launcher == "mpirun":
        names = [k for k in env if k in _MPI_FORWARD or k.startswith("SPELLM_")]
        exports = [arg for name in names for arg in ("-x", name)]
        return ["mpirun", "-np", str(nproc), "--oversubscribe", *exports, PY, *train]
    if launcher == "single":
        return [PY, *train]
    raise ValueError(launcher)


def _env(launcher: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **(extra or {}))
    if launcher == "mpirun":
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def launch(
    launcher: str,
    config: Path,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run `spellm-ds train` to completion under a launcher; kill its whole process group on timeout."""
    env = _env(launcher, env)
    proc = subprocess.Popen(
        command(launcher, config, overrides or [], env),
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{launcher} run timed out after {timeout}s:\n{out[-6000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def start(
    launcher: str, config: Path, overrides: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    """Start a run in the background (own process group); return the process and its output log path."""
    env = _env(launcher, env)
    log = config.with_suffix(".log")
    fh = open(log, "w", encoding="utf-8")  # noqa: SIM115 (closed by the child's exit; the test reads it)
    proc = subprocess.Popen(
        command(launcher, config, overrides or [], env),
        env=env,
        cwd=REPO_ROOT,
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    fh.close()
    return proc, log


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Poll `predicate` until true; fail when it is not within `timeout` or `proc` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_trace(trace_dir: Path, max_step: int | None = None) -> list[int]:
    """Sample indices every rank drew (`SPELLM_TRACE_SAMPLES`), up to optimizer step `max_step`."""
    out: list[int] = []
    for f in sorted(Path(trace_dir).glob("rank*.tsv")):
        for line in f.read_text(encoding="utf-8").splitlines():
            step, idx = line.split("\t")
            if max_step is None or int(step) <= max_step:
                out += [int(i) for i in idx.split(",") if int(i) >= 0]
    return out


def exactly_once(indices: list[int], total: int) -> tuple[list[int], list[int]]:
    """Return (missing, repeated) sample indices of one epoch of `total` samples."""
    counts = Counter(indices)
    return sorted(set(range(total)) - set(counts)), sorted(i for i, c in counts.items() if c > 1)


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a TensorBoard log directory, read back with tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_texts(tb_dir: Path) -> dict[str, list[str]]:
    """All text summaries of a TensorBoard log directory by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag: [b.decode("utf-8") for e in acc.Tensors(tag) for b in e.tensor_proto.string_val]
        for tag in acc.Tags()["tensors"]
    }


def checkpoint_params(root: Path, tag: str) -> dict[str, Any]:
    """Consolidated parameters of a ZeRO-3 checkpoint (DeepSpeed's own zero_to_fp32 reader)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))


def shard_teacher(location: Path) -> dict[int, tuple[Any, Any]]:
    """Sample index -> (top-k ids, top-k log-probs) as the teacher shards at `location` store them."""
    from spellm_ds.data import shards

    out = {}
    for entry in shards.read_index(location)["shards"]:
        for s in shards.iter_shard(Path(location) / entry["name"]):
            out[int(s["__key__"])] = (s["topk_ids"], s["topk_logprobs"])
    return out


def read_teacher_trace(trace_dir: Path) -> list[tuple[int, Any, Any]]:
    """(sample index, top-k ids, top-k log-probs) of every sequence the online teacher saw."""
    import numpy as np

    out = []
    for f in sorted(Path(trace_dir).glob("rank*_*.npz")):
        with np.load(f) as z:
            for i, index in enumerate(z["sample_index"].tolist()):
                if index >= 0:
                    out.append((int(index), z["topk_ids"][i], z["topk_logprobs"][i]))
    return out


def usr1_after_two_steps(cfg: dict[str, Any], trace: Path) -> tuple[int, str]:
    """Run `cfg` on 2 ranks under mpirun, send SIGUSR1 after two steps; return (exit code, log text).

    mpirun forwards SIGUSR1 to every rank; the step sleep keeps the run alive until the signal lands."""
    proc, log = start(
        "mpirun", cfg, env={"SPELLM_TRACE_SAMPLES": str(trace), "SPELLM_TEST_STEP_SLEEP": "0.5"}
    )
    try:
        wait_for(lambda: len(read_trace(trace)) >= 2 * 2 * 2, 240, proc, "two training steps")
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, log.read_text()


def assert_complete_rank_files(tag_dir: Path, ranks: int = 2) -> None:
    """Every rank's model and optimizer state file is in the checkpoint tag directory."""
    for rank in range(ranks):
        for kind in ("model_states", "optim_states"):
            assert (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_{kind}.pt").is_file(), (rank, kind)


def kill9_then_resume(cfg: dict[str, Any], work: Path, reference: Path, nan: str, steps: int) -> Path:
    """Kill every rank after step 10 (saves every 4 steps), resume with `resume: auto`; check the result.

    Checks: `latest` still names step 8, the resumed run says so, every sample is drawn exactly once
    over both runs, and the final parameters equal the uninterrupted run's checkpoints in `reference`.
    Returns the run's checkpoint directory."""
    from spellm_ds.train.checkpoint import LATEST, tag_for

    env = {"SPELLM_TEST_NAN_BATCHES": nan, "SPELLM_TEST_KILL_AT_STEP": "10"}
    killed = launch("torchrun", cfg, env={**env, "SPELLM_TRACE_SAMPLES": str(work / "t1")})
    assert killed.returncode != 0
    root = work / "run" / "checkpoints"
    assert (root / LATEST).read_text() == tag_for(8)  # the kill came after step 10, between saves
    del env["SPELLM_TEST_KILL_AT_STEP"]
    resumed = launch("torchrun", cfg, env={**env, "SPELLM_TRACE_SAMPLES": str(work / "t2")})
    assert resumed.returncode == 0, resumed.stdout[-8000:]
    assert f"resumed from {root / tag_for(8)}" in resumed.stdout
    drawn = read_trace(work / "t1", max_step=8) + read_trace(work / "t2")
    missing, repeated = exactly_once(drawn, TRAIN_SAMPLES)
    assert missing == [] and repeated == []
    ref = checkpoint_params(reference, tag_for(steps))
    got = checkpoint_params(root, tag_for(steps))
    assert ref.keys() == got.keys()
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst <= 1e-7, f"resumed parameters differ from the uninterrupted run by {worst}"
    return root
