"""A throwaway one-node SLURM on localhost for the tests: munged, slurmctld and slurmd started by hand.

Debian's `munge` and `slurm-wlm` packages (Slurm 22.05) with a slurm.conf generated in a temp dir: no
systemd, no accounting, no cgroups. Each cluster gets its own munge socket, ports, state directory and
first job id, so two test sessions on one host do not meet. The node is named after this host (job
scripts use node names as rendezvous addresses, so the name must resolve). Daemons run in the
foreground as children of the test process and are stopped by PID. `tests/test_slurm.py` wraps this
in a session-scoped fixture; `unavailable()` gives the reason to skip where SLURM cannot run (not
root, packages missing).
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MUNGE_DIR = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
BINARIES = (
    "munged",
    "munge",
    "unmunge",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
    "scancel",
    "sinfo",
)
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
_FIELD = re.compile(r"(\w+)=(\S*)")


class SlurmStartError(RuntimeError):
    """A daemon of the local cluster did not come up (the message carries its log tail)."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """The state of one job (or array task) as `scontrol show job` reports it."""

    job_id: str
    state: str
    exit_code: int
    signal: int
    restarts: int
    stdout: str
    fields: dict

    @property
    def done(self) -> bool:
        """True once the job reached a terminal state."""
        return self.state in TERMINAL_STATES


def unavailable() -> str | None:
    """Return why a local SLURM cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (munged runs as user munge, slurmd as root)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing binaries: {', '.join(missing)} (Debian packages munge slurm-wlm slurmctld slurmd)"
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (Debian package munge not installed)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test process dies without stopping the daemons."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _node_name() -> str:
    """This host's short name when it resolves (job scripts use node names as rendezvous addresses)."""
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return "localhost"
    return host


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


class SlurmCluster:
    """One node (`cpus` CPUs) and one default partition, all state under `workdir`."""

    def __init__(self, workdir: Path, *, cpus: int = 2, real_memory_mb: int = 20000) -> None:
        self.workdir = Path(workdir)
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        tag = f"{os.getpid()}x{random.randrange(10**6)}"
        self.node = _node_name()
        self.munge_socket = MUNGE_DIR / f"spellm-{tag}.socket"
        self.conf = self.workdir / "slurm.conf"
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM client commands (points them at this cluster's slurm.conf)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        """Generate slurm.conf (fresh ports, node name and first job id) under `workdir`."""
        w = self.workdir
        for sub in ("state", "spool"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=spellmtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool'}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'slurmd.pid'}",
            f"SlurmctldLogFile={w / 'slurmctld.log'}",
            f"SlurmdLogFile={w / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "JobRequeue=1",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=300",
            f"FirstJobId={random.randrange(1000, 60000)}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        log = self.workdir / f"{name}.stdout"
        self._logs[name] = log
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                **kw,
            )
        self._procs[name] = proc
        return proc

    def _start_munge(self, timeout: float) -> None:
        import pwd

        pw = pwd.getpwnam("munge")
        MUNGE_DIR.mkdir(mode=0o755, exist_ok=True)
        os.chown(MUNGE_DIR, pw.pw_uid, pw.pw_gid)
        MUNGE_DIR.chmod(0o755)
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
            os.chown(MUNGE_KEY.parent, pw.pw_uid, pw.pw_gid)
            subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True, timeout=60)
            os.chown(MUNGE_KEY, pw.pw_uid, pw.pw_gid)
            MUNGE_KEY.chmod(0o400)
        base = str(self.munge_socket)[: -len(".socket")]
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={MUNGE_KEY}",
                f"--pid-file={base}.pid",
                f"--log-file={base}.log",
                f"--seed-file={base}.seed",
            ],
            user=pw.pw_uid,
            group=pw.pw_gid,
            extra_groups=[],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("munged", Path(f"{base}.log"))
            cred = subprocess.run(
                ["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10
            )
            if cred.returncode == 0:
                check = subprocess.run(
                    ["unmunge", "-S", str(self.munge_socket)],
                    input=cred.stdout,
                    capture_output=True,
                    timeout=10,
                )
                if check.returncode == 0:
                    return
            time.sleep(0.1)
        raise SlurmStartError(f"munged did not answer within {timeout} s:\n{_tail(Path(f'{base}.log'))}")

    def _check_alive(self, name: str, log: Path) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise SlurmStartError(
                f"{name} exited with code {proc.returncode}:\n{_tail(self._logs[name])}\n{_tail(log)}"
            )

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, slurmctld and slurmd; return once `sinfo` shows the node idle."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_conf()
        try:
            self._start_munge(timeout)
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)], env=self.env)
            time.sleep(0.3)
            self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)], env=self.env)
            deadline = time.monotonic() + timeout
            state = ""
            while time.monotonic() < deadline:
                self._check_alive("slurmctld", self.workdir / "slurmctld.log")
                self._check_alive("slurmd", self.workdir / "slurmd.log")
                out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
                state = out.stdout.strip()
                if out.returncode == 0 and state.split()[-1:] == ["idle"]:
                    return
                time.sleep(0.2)
            raise SlurmStartError(
                f"node not idle within {timeout} s (sinfo: {state!r}):\n"
                f"{_tail(self.workdir / 'slurmctld.log')}\n{_tail(self.workdir / 'slurmd.log')}"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by PID (TERM, then KILL)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user=root"], check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                out = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        base = str(self.munge_socket)[: -len(".socket")]
        for suffix in (".pid", ".log", ".seed"):
            Path(base + suffix).unlink(missing_ok=True)

    # ---- client commands -------------------------------------------------------------------------
    def run(
        self, argv: list[str], *, check: bool = True, timeout: float = 30, **kw
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        kw.setdefault("env", self.env)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def sbatch(
        self, script: Path, *options: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> str:
        """Submit `script` with `sbatch --parsable`; `env` adds variables to the job's environment."""
        full = {**self.env, **(env or {})}
        out = self.run(["sbatch", "--parsable", *options, str(script)], env=full, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[Job]:
        """The job's records (one per array task); empty once SLURM has forgotten it."""
        out = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        if out.returncode != 0:
            return []
        records = []
        for line in out.stdout.splitlines():
            fields = dict(_FIELD.findall(line))
            if "JobId" not in fields:
                continue
            code, _, sig = fields.get("ExitCode", "0:0").partition(":")
            task = fields.get("ArrayTaskId")
            records.append(
                Job(
                    job_id=f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"],
                    state=fields.get("JobState", ""),
                    exit_code=int(code or 0),
                    signal=int(sig or 0),
                    restarts=int(fields.get("Restarts", "0") or 0),
                    stdout=fields.get("StdOut", ""),
                    fields=fields,
                )
            )
        return records

    def wait(self, job_id: str, *, timeout: float, until=None, poll: float = 0.25) -> list[Job]:
        """Poll until `until(jobs)` holds (default: every record terminal); raise TimeoutError otherwise."""
        until = until or (lambda jobs: bool(jobs) and all(j.done for j in jobs))
        deadline = time.monotonic() + timeout
        jobs: list[Job] = []
        while time.monotonic() < deadline:
            jobs = self.jobs(job_id)
            if until(jobs):
                return jobs
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} not done after {timeout} s: {[(j.job_id, j.state) for j in jobs]}\n"
            f"{_tail(self.workdir / 'slurmctld.log', 15)}"
        )
