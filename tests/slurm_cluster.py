"""Throwaway SLURM clusters on localhost for the tests: munged, slurmctld and slurmd started by hand.

Debian's `munge` and `slurm-wlm` packages (Slurm 22.05) with a slurm.conf generated in a temp dir: no
systemd, no accounting, no cgroups. Each cluster gets its own munge socket, ports, state directory and
first job id, so two test sessions on one host do not meet. The node is named after this host (job
scripts use node names as rendezvous addresses, so the name must resolve). Daemons run in the
foreground as children of the test process and are stopped by PID. `tests/test_slurm.py` wraps this
in a session-scoped fixture; `unavailable()` gives the reason to skip where SLURM cannot run (not
root, packages missing).
"""

from __future__ import annotations

import contextlib
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
        self.nodes = [self.node]
        self.slurmd_timeout = 300
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
        for sub in ("state", *(f"spool/{n}" for n in self.nodes)):
            (w / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=spellmtest",
            f"SlurmctldHost={host}({self.controller_addr})",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool' / '%n'}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={w / 'slurmctld.log'}",
            f"SlurmdLogFile={w / 'slurmd-%n.log'}",
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
            f"SlurmdTimeout={self.slurmd_timeout}",
            f"FirstJobId={random.randrange(1000, 60000)}",
            *(
                f"NodeName={name} NodeAddr={addr} NodeHostname={hostname} CPUs={self.cpus} "
                f"RealMemory={self.real_memory_mb} State=UNKNOWN"
                for name, addr, hostname in self.node_table()
            ),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # ---- where things run (a subclass places daemons and clients elsewhere) ------------------------
    @property
    def controller_addr(self) -> str:
        """The address slurmctld listens on."""
        return "127.0.0.1"

    def node_table(self) -> list[tuple[str, str, str]]:
        """(NodeName, NodeAddr, NodeHostname) of every node."""
        return [(self.node, "127.0.0.1", socket.gethostname().split(".")[0])]

    def wrap(self, where: str, argv: list[str]) -> list[str]:
        """The command line that runs `argv` on `where` (a node name, or "controller" for the clients)."""
        return argv

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
        """Start munged, slurmctld and one slurmd per node; return once `sinfo` shows every node idle."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_conf()
        try:
            self._start_munge(timeout)
            ctl = ["slurmctld", "-D", "-c", "-f", str(self.conf)]
            self._spawn("slurmctld", self.wrap("controller", ctl), env=self.env)
            time.sleep(0.3)
            for node in self.nodes:
                self.start_slurmd(node)
            self.wait_nodes("idle", timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def start_slurmd(self, node: str) -> None:
        """Start (or restart) the slurmd of `node` in the foreground."""
        argv = ["slurmd", "-D", "-N", node, "-f", str(self.conf)]
        self._spawn(f"slurmd-{node}", self.wrap(node, argv), env=self.env)

    def wait_nodes(self, state: str, *, timeout: float, nodes: list[str] | None = None) -> None:
        """Poll `sinfo` until every node of `nodes` (default: all) reports `state` (e.g. idle, down)."""
        want = set(nodes or self.nodes)
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            self._check_alive("slurmctld", self.workdir / "slurmctld.log")
            for node in want:
                name = f"slurmd-{node}"
                if name in self._procs and state != "down":
                    self._check_alive(name, self.workdir / f"slurmd-{node}.log")
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            seen = out.stdout.strip()
            states = dict(line.split()[:2] for line in seen.splitlines() if len(line.split()) >= 2)
            if out.returncode == 0 and all(states.get(n, "").rstrip("*") == state for n in want):
                return
            time.sleep(0.2)
        logs = "\n".join(_tail(self.workdir / f"slurmd-{n}.log") for n in sorted(want))
        raise SlurmStartError(
            f"nodes {sorted(want)} not {state} within {timeout} s (sinfo: {seen!r}):\n"
            f"{_tail(self.workdir / 'slurmctld.log')}\n{logs}"
        )

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
        daemons = [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "munged"]
        for name in daemons:
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
        out = subprocess.run(
            self.wrap("controller", argv), capture_output=True, text=True, timeout=timeout, **kw
        )
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


# ---- two nodes on one machine ----------------------------------------------------------------------
NETNS_DIR = Path("/run/netns")
_NETNS_PREFIX = "spellm"


def netns_unavailable() -> str | None:
    """Return why network namespaces (and the two-node cluster) cannot be used here, or None."""
    reason = unavailable()
    if reason:
        return reason
    missing = [b for b in ("ip", "unshare", "nsenter", "mount") if shutil.which(b) is None]
    if missing:
        return f"missing binaries: {', '.join(missing)} (Debian packages iproute2 util-linux mount)"
    name = f"{_NETNS_PREFIX}{os.getpid()}probe"
    try:
        out = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return f"this machine refuses network namespaces (`ip netns add`: {out.stderr.strip()})"
        out = subprocess.run(
            ["nsenter", f"--net={NETNS_DIR / name}", "--", "unshare", "--mount", "--uts", "--", "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            return f"this machine refuses UTS namespaces inside a network namespace: {out.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


def _remove_stale_namespaces() -> None:
    """Delete namespaces this module left behind in test processes that no longer exist."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        m = re.fullmatch(rf"{_NETNS_PREFIX}(\d+)x\d+[a-z0-9]+", entry.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, timeout=30)


class NetnsSlurmCluster(SlurmCluster):
    """Nodes node1, node2, ... each in its own network and UTS namespace, slurmctld in a third one.

    The controller's namespace holds a bridge (`10.<a>.<b>.1/24`); each node's namespace holds one end
    of a veth pair whose other end is enslaved to the bridge, so node `i` is `10.<a>.<b>.<10+i>` and
    reaches the controller and the other nodes over the bridge. Each node runs with its own hostname
    (its NodeName) and with a hosts file of the cluster bind-mounted over /etc/hosts in its own mount
    namespace only, so job scripts resolve node names exactly as on a cluster; the machine's files and
    its own network namespace are never changed. Client commands (`sbatch`, `scontrol`, ...) run in the
    controller's namespace. munge is shared through its socket on the common file system.
    """

    def __init__(self, workdir: Path, *, nodes: int = 2, cpus: int = 2, real_memory_mb: int = 10000) -> None:
        super().__init__(workdir, cpus=cpus, real_memory_mb=real_memory_mb)
        tag = self.munge_socket.name[len("spellm-") : -len(".socket")]
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.node = self.nodes[0]
        self.slurmd_timeout = 6  # a dead node is declared DOWN (and its jobs requeued) within seconds
        self.namespaces = {n: f"{_NETNS_PREFIX}{tag}{n[-1]}" for n in self.nodes}
        self.namespaces["controller"] = f"{_NETNS_PREFIX}{tag}c"
        subnet = f"10.{random.randrange(64, 128)}.{random.randrange(256)}"
        self.addrs = {n: f"{subnet}.{10 + i}" for i, n in enumerate(self.nodes, start=1)}
        self._controller_addr = f"{subnet}.1"
        self.hosts_file = self.workdir / "hosts"

    @property
    def controller_addr(self) -> str:
        """The bridge's address in the controller's namespace."""
        return self._controller_addr

    def node_table(self) -> list[tuple[str, str, str]]:
        """(NodeName, NodeAddr, NodeHostname): each node is its own host."""
        return [(n, self.addrs[n], n) for n in self.nodes]

    def wrap(self, where: str, argv: list[str]) -> list[str]:
        """Run in the controller's namespace, or in a node's namespaces with its hostname and hosts file."""
        # only the network namespace: `ip netns exec` would also remount /sys, hiding the cgroup tree
        net = ["nsenter", f"--net={NETNS_DIR / self.namespaces[where]}", "--"]
        if where == "controller":
            return [*net, *argv]
        # a mount namespace of its own (private by default): the bind mount stays inside it
        script = f'mount --bind {self.hosts_file} /etc/hosts && hostname {where} && exec "$@"'
        return [*net, "unshare", "--mount", "--uts", "--", "sh", "-c", script, "sh", *argv]

    def _ip(self, *args: str) -> None:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise SlurmStartError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")

    def _up_network(self) -> None:
        _remove_stale_namespaces()
        ctl = self.namespaces["controller"]
        for ns in self.namespaces.values():
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        self._ip("-n", ctl, "addr", "add", f"{self.controller_addr}/24", "dev", "br0")
        self._ip("-n", ctl, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes, start=1):
            ns = self.namespaces[node]
            self._ip(
                "link", "add", f"v{i}", "netns", ctl, "type", "veth", "peer", "name", "eth0", "netns", ns
            )
            self._ip("-n", ctl, "link", "set", f"v{i}", "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{self.addrs[node]}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
        hosts = ["127.0.0.1 localhost", f"{self.controller_addr} controller"]
        hosts += [f"{self.addrs[n]} {n}" for n in self.nodes]
        self.hosts_file.write_text("\n".join(hosts) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        """Create the namespaces and the bridge, then start the daemons (see `SlurmCluster.start`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._up_network()
        except BaseException:
            self._down_network()
            raise
        super().start(timeout)

    def stop(self) -> None:
        """Stop the daemons, kill whatever is left in the node namespaces, delete the namespaces."""
        try:
            super().stop()
        finally:
            self._down_network()

    def _down_network(self) -> None:
        for node in self.nodes:
            self.kill_processes(node)
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def pids(self, node: str) -> list[int]:
        """PIDs of every process in `node`'s network namespace (its slurmd, job steps and ranks)."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.namespaces[node]], capture_output=True, text=True, timeout=30
        )
        return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []

    def kill_processes(self, node: str) -> list[int]:
        """SIGKILL every process on `node` (slurmd included), as if the node lost power; return the PIDs."""
        killed = []
        for _ in range(5):  # processes forked while the first ones die
            pids = self.pids(node)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        proc = self._procs.get(f"slurmd-{node}")
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        return killed

    def read_only_on(self, node: str, path: Path) -> None:
        """Make `path` read-only for everything on `node` (its slurmd's mount namespace) and nowhere else."""
        pid = str(self._procs[f"slurmd-{node}"].pid)
        for opts in (["--bind"], ["-o", "remount,bind,ro"]):
            out = subprocess.run(
                ["nsenter", "-t", pid, "-m", "--", "mount", *opts, str(path), str(path)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if out.returncode != 0:
                raise RuntimeError(f"mount {' '.join(opts)} {path} on {node} failed: {out.stderr.strip()}")

    def writable_again_on(self, node: str, path: Path) -> None:
        """Undo `read_only_on`."""
        pid = str(self._procs[f"slurmd-{node}"].pid)
        subprocess.run(
            ["nsenter", "-t", pid, "-m", "--", "umount", str(path)], capture_output=True, timeout=30
        )
