"""Cached pipeline stages run through the real `spellm-ds` CLI as subprocesses (demo and fidelity bench).

A stage is one command (`spellm-ds build-shards ...`, a `torchrun ... train`, ...). Its key hashes what
decides its output: the command's arguments, the keys of the stages it reads, and the source of the code
it runs. After a successful run the key, the wall time and the measured throughput are written to
`<root>/stages/<name>.json`; a later run with the same key, whose artefact is still there, is skipped.
Before a stage runs with a new key its output paths are removed (they belong to this pipeline only);
a stage interrupted under the same key runs again into the same paths, so the shard builder and the
trainer resume what they had done. The command's output streams to the terminal and to
`<root>/stages/<name>.log`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spellm_ds.errors import SpellmError

REPO = Path(__file__).resolve().parents[1]

# Source files whose change invalidates a stage (relative to the repository root; globs). The library's
# folders are its stages, so a stage names the folders whose code runs in it.
FLOOR = ["spellm_ds/*.py", "spellm_ds/config/*.py", "spellm_ds/charset/*.py"]
SOURCES = {
    "teacher": ["examples/demo_teacher.py", "examples/local_models.py"],
    "real_teacher": [
        "examples/real_teacher.py",
        "spellm_ds/model/gguf_import.py",
        "examples/demo_teacher.py",
    ],
    "shards": [*FLOOR, "spellm_ds/data/*.py"],
    "train": [*FLOOR, "spellm_ds/data/*.py", "spellm_ds/model/*.py", "spellm_ds/train/*.py"],
    "export": [*FLOOR, "spellm_ds/export/*.py", "spellm_ds/train/*.py"],
    "eval": [
        *FLOOR,
        "spellm_ds/eval/*.py",
        "spellm_ds/inference/*.py",
        "spellm_ds/model/*.py",
        "spellm_ds/export/*.py",
    ],
    "generate": [
        *FLOOR,
        "spellm_ds/eval/*.py",
        "spellm_ds/inference/*.py",
        "spellm_ds/model/*.py",
        "spellm_ds/export/*.py",
    ],
}


TEACHER_MODULES = ("demo_teacher.py", "real_teacher.py", "gguf_import.py")


def source_hash(patterns: Iterable[str]) -> str:
    """Return a sha256 over the contents of the repository files matching `patterns`."""
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(REPO.glob(pattern)):
            # The teachers reach later stages through their own cache keys, not their source.
            if path.is_file() and (path.name not in TEACHER_MODULES or pattern.endswith(path.name)):
                h.update(str(path.relative_to(REPO)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def key_of(obj: Any) -> str:
    """Return a short sha256 of a JSON-serialisable description of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def free_port() -> int:
    """Return a TCP port that is free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spellm_cli(*args: str) -> list[str]:
    """Return the argv of a `spellm-ds` subcommand run with this interpreter."""
    return [sys.executable, "-m", "spellm_ds.cli", *args]


def torchrun(ranks: int, *args: str) -> list[str]:
    """Return the argv of `torchrun` on this host with `ranks` processes and a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]


def subprocess_env(threads_per_process: int | None = None) -> dict[str, str]:
    """Return the environment for stage commands: CPU DeepSpeed by default, offline, unbuffered."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if threads_per_process:
        env["OMP_NUM_THREADS"] = str(threads_per_process)
    return env


@dataclass(kw_only=True)
class StageResult:
    """One stage's outcome: key, whether it came from cache, wall time, artefact and measured figures."""

    name: str
    key: str
    cached: bool
    seconds: float
    artefact: str
    command: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def _present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def run_streaming(cmd: list[str], log_path: Path, env: dict[str, str], echo: bool = True) -> int:
    """Run `cmd` from the repository root, copying its output to the terminal and to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read1(1 << 16):
                log.write(chunk)
                log.flush()  # the log is the only progress view with echo off
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            # SIGTERM lets the trainer save a checkpoint at the next step boundary before it exits.
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
            raise
        return proc.wait()


class StageRunner:
    """Runs named stages under `<root>/stages/`, skipping those whose key and artefact are unchanged."""

    def __init__(
        self, root: str | os.PathLike, echo: bool = True, log: Callable[[str], None] = print
    ) -> None:
        self.root = Path(root)
        self.dir = self.root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.log = log
        self.results: dict[str, StageResult] = {}

    def run(
        self,
        name: str,
        *,
        inputs: dict[str, Any],
        command: list[str],
        artefact: str | os.PathLike,
        outputs: list[str | os.PathLike] | None = None,
        measure: Callable[[float], dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
    ) -> StageResult:
        """Run one stage (or reuse it); `measure(seconds)` returns its figures after a real run."""
        key = key_of(inputs)
        artefact = Path(artefact)
        stamp = self.dir / f"{name}.json"
        started = self.dir / f"{name}.started"
        reason = "first run"
        if stamp.is_file():
            done = json.loads(stamp.read_text(encoding="utf-8"))
            old_inputs = done.pop("inputs", {})
            if done.get("key") == key and _present(artefact):
                result = StageResult(**{**done, "cached": True})
                self.log(f"[demo] {name}: cached ({result.seconds:.0f} s when built) -> {artefact}")
                self.results[name] = result
                return result
            changed = sorted(
                k for k in {*inputs, *old_inputs} if key_of(inputs.get(k)) != key_of(old_inputs.get(k))
            )
            reason = f"inputs changed: {', '.join(changed)}" if changed else f"{artefact} is missing"
        if not (started.is_file() and started.read_text().strip() == key):
            for out in [artefact] if outputs is None else outputs:
                out = Path(out)
                if out.is_dir():
                    shutil.rmtree(out)
                elif out.exists():
                    out.unlink()
        stamp.unlink(missing_ok=True)
        started.write_text(key + "\n")
        self.log(f"[demo] {name}: running ({reason})\n$ {' '.join(command)}")
        t0 = time.perf_counter()
        rc = run_streaming(command, self.dir / f"{name}.log", env or subprocess_env(), echo=self.echo)
        seconds = time.perf_counter() - t0
        if rc != 0:
            tail = (self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            raise SpellmError(
                f"stage {name} failed (exit code {rc}); full log: {self.dir / f'{name}.log'}\n"
                + "\n".join(tail)
            )
        if not _present(artefact):
            raise SpellmError(f"stage {name} finished but produced no {artefact}")
        metrics = measure(seconds) if measure else {}
        result = StageResult(
            name=name,
            key=key,
            cached=False,
            seconds=seconds,
            artefact=str(artefact),
            command=command,
            metrics=metrics,
        )
        stamp.write_text(json.dumps({**asdict(result), "inputs": inputs}, indent=1) + "\n", encoding="utf-8")
        started.unlink(missing_ok=True)
        self.log(f"[demo] {name}: done in {seconds:.0f} s {_fmt_metrics(metrics)}")
        self.results[name] = result
        return result


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    rate = metrics.get("throughput")
    return f"({rate:,.0f} {metrics.get('unit', '')})" if isinstance(rate, int | float) else ""


def shard_totals(directory: str | os.PathLike) -> dict[str, int]:
    """Return the `totals` of a shard dataset's index.json (samples, tokens, bytes, shards)."""
    from spellm_ds.data.shards import read_index

    return dict(read_index(str(directory))["totals"])


def tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar series under a TensorBoard log directory as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(dict(points).items()) for tag, points in series.items()}
