"""The real `slurm/*.sh` scripts on a real two-node SLURM: node1 and node2 in network namespaces.

One cluster for the session (tests/slurm_cluster.py, `NetnsSlurmCluster`): a bridge joins the nodes'
namespaces, each node has its own address and hostname, and job scripts resolve node names as on a
cluster. Training uses `ds_configs/zero3_70b_multinode.json` itself with its ZeRO sizes divided by 10^4
for the tiny model and the hpZ partition set to the ranks per node (2), on 2 nodes x 2 CPU ranks.

Covers: `build_shards.sh` as an array whose tasks run on both nodes (bytes equal to one process);
`distill_70b.sh -N 2 --ntasks-per-node 2` (rendezvous on the first node, world size 4, hpZ groups that
DeepSpeed built are node-local) and `export.sh` after it; USR1 mid-run → checkpoint, requeue, resume
with the parameters and samples of the uninterrupted run; a checkpoint directory one node cannot write
(the job fails with the path in the error and no `latest`); node2 dying mid-run (`kill_processes`):
SLURM cancels and requeues the job, which waits for node2 with its two-node request until it is shrunk
to node1 (`scontrol update ... NumNodes=1 NumTasks=2 NumCPUs=2`, what an operator does), then resumes
from the last complete checkpoint at world size 2 through DeepSpeed's universal checkpoint, with the
counters of the uninterrupted run, finite parameters and an export that loads. That test runs last and
restarts node2's slurmd at its end.

Run alone: .venv/bin/python -m pytest tests/test_slurm_multinode.py -q -rs
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import BUILD_OPTIONS, REPO_ROOT
from slurm_cluster import NetnsSlurmCluster, SlurmStartError, netns_unavailable
from test_slurm import SLURM_DIR, TRAIN_STEPS, _job_env, _read, _trace, _train_overrides, _trainable_fp32

from spellm_ds.errors import SpellmError
from spellm_ds.train import check_hpz_fits_node

pytestmark = pytest.mark.slurm
NODES, PER_NODE = 2, 2
TWO_NODE_JOB = (
    f"--nodes={NODES}",
    f"--ntasks-per-node={PER_NODE}",
    "--gpus-per-node=0",
    "--cpus-per-task=1",
    "--time=01:00:00",
)
ZERO_SCALE = 10**4  # the 70B file's ZeRO sizes over this, for a model ~10^5 times smaller


@pytest.fixture(scope="session")
def two_nodes():
    """A two-node SLURM (node1, node2 in their own network namespaces) for the whole session."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"two-node SLURM unavailable: {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="spellm-slurm2-"))
    cluster = NetnsSlurmCluster(workdir, nodes=NODES, cpus=PER_NODE)
    try:
        cluster.start()
    except SlurmStartError as exc:
        pytest.fail(f"two-node SLURM did not start: {exc}")
    yield cluster
    cluster.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def multinode_ds_config(tmp_path_factory) -> Path:
    """ds_configs/zero3_70b_multinode.json with hpZ = ranks per node and ZeRO sizes scaled down."""
    cfg = json.loads((REPO_ROOT / "ds_configs" / "zero3_70b_multinode.json").read_text())
    zero = cfg["zero_optimization"]
    assert zero["zero_hpz_partition_size"] > 1 and zero["overlap_comm"], "the file no longer uses hpZ"
    zero["zero_hpz_partition_size"] = PER_NODE
    for key in (
        "reduce_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
    ):
        zero[key] = int(zero[key]) // ZERO_SCALE
    path = tmp_path_factory.mktemp("ds") / "zero3_multinode_tiny.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _submit(cluster, tmp: Path, name: str, tiny_llama, dataset, ds_config, *options, **env) -> tuple:
    """Submit distill_70b.sh with the tiny recipe on the multinode DeepSpeed config; (job, run dir, log)."""
    run_dir, trace = tmp / name, tmp / f"{name}-trace"
    trace.mkdir(parents=True)
    extra = _train_overrides(run_dir, tiny_llama, dataset).replace("batch.micro=4", "batch.micro=2")
    job = cluster.sbatch(
        SLURM_DIR / "distill_70b.sh",
        *(options or TWO_NODE_JOB),
        f"--job-name={name}",
        f"--output={tmp}/%x-%j.out",
        env=_job_env(
            CONFIG="configs/tiny_cpu.yaml",
            EXTRA=f"{extra} deepspeed={ds_config}",
            SPELLM_TRACE_SAMPLES=str(trace),
            **{"OMP_NUM_THREADS": "1", "LOG_VERSIONS": "0", "TASK_EXIT_WAIT": "20", **env},
        ),
        cwd=REPO_ROOT,
    )
    return job, run_dir, tmp / f"{name}-{job}.out"


def _until_step(trace_file: Path, step: int):
    """A `wait` condition: `trace_file` shows a micro-batch of optimizer step `step`."""
    return lambda _: trace_file.exists() and f"\n{step}\t" in "\n" + trace_file.read_text()


@pytest.fixture(scope="module")
def reference(two_nodes, tmp_path_factory, tiny_llama, teacher_dataset, multinode_ds_config):
    """distill_70b.sh on 2 nodes x 2 ranks, never interrupted: (job record, run dir, log, trace dir)."""
    tmp = tmp_path_factory.mktemp("distill2")
    job, run_dir, log_path = _submit(two_nodes, tmp, "ref", tiny_llama, teacher_dataset, multinode_ds_config)
    (rec,) = two_nodes.wait(job, timeout=400)
    return rec, run_dir, _read(log_path), tmp / "ref-trace"


def test_hpz_partition_must_fit_in_a_node():
    """An hpZ partition that does not divide the ranks per node is refused, naming the file and field."""
    path = "ds_configs/zero3_70b_multinode.json"
    ds = json.loads((REPO_ROOT / path).read_text())
    with pytest.raises(
        SpellmError,
        match=r"multinode.json: zero_optimization.zero_hpz_partition_size is 8, but this job runs 4 rank",
    ):
        check_hpz_fits_node(path, ds, 4)
    check_hpz_fits_node(path, ds, 8)
    check_hpz_fits_node(path, ds, 16)


def test_two_node_array_build_shards(two_nodes, tmp_path, tiny_llama, build_inputs, teacher_dataset):
    """build_shards.sh as a 2-task array, one task per node (2 CPUs each): same bytes as one process."""
    out = tmp_path / "array"
    job = two_nodes.sbatch(
        SLURM_DIR / "build_shards.sh",
        "--array=0-1",
        f"--cpus-per-task={PER_NODE}",  # a whole node per task: the two tasks land on different nodes
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
    tasks = two_nodes.wait(job, timeout=300)
    logs = "\n".join(_read(p) for p in sorted(tmp_path.glob("*.out")))
    assert all((t.state, t.exit_code) == ("COMPLETED", 0) for t in tasks) and len(tasks) == 2, logs
    assert sorted(t.fields["NodeList"] for t in tasks) == ["node1", "node2"], logs
    assert sorted(re.findall(r"task\(s\) on (node\d)", logs)) == ["node1", "node2"], logs
    reference = {
        p.name: p.read_bytes() for p in teacher_dataset.iterdir() if p.name.startswith(("shard-", "index"))
    }
    built = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith(("shard-", "index"))}
    assert sorted(built) == sorted(reference) and any(n.endswith(".tar") for n in built)
    assert [n for n in reference if built[n] != reference[n]] == []


def test_two_node_distill_trains_then_export(two_nodes, reference, tmp_path):
    """2 nodes x 2 ranks: rendezvous on node1, world size 4, node-local hpZ groups, checkpoints; export.sh."""
    rec, run_dir, log, _ = reference
    assert (rec.state, rec.exit_code, rec.restarts, rec.fields["NodeList"]) == (
        "COMPLETED",
        0,
        0,
        "node[1-2]",
    ), log
    assert re.search(r"on node\[1-2\]: 2 node\(s\) x 2 task\(s\), rendezvous node1:\d+", log), log
    assert f"step {TRAIN_STEPS}:" in log and "world size 4" in log, log
    # the secondary partitions DeepSpeed built: one per node, exactly that node's ranks
    assert "hpZ secondary partitions of 2 ranks: [0, 1] on node1; [2, 3] on node2" in log, log
    checkpoints = run_dir / "checkpoints"
    final = f"step_{TRAIN_STEPS:08d}"
    assert (checkpoints / "latest").read_text().strip() == final
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000003", final]
    # every rank of both nodes wrote its ZeRO partition into the shared checkpoint directory
    assert len(list((checkpoints / final).glob("*optim_states.pt"))) == NODES * PER_NODE

    out = tmp_path / "export"
    job = two_nodes.sbatch(
        SLURM_DIR / "export.sh",
        f"--ntasks-per-node={PER_NODE}",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        env=_job_env(CHECKPOINT=str(checkpoints), OUTPUT=str(out)),
        cwd=REPO_ROOT,
    )
    (exp,) = two_nodes.wait(job, timeout=240)
    exp_log = _read(tmp_path / f"spellm-export-{job}.out")
    assert (exp.state, exp.exit_code) == ("COMPLETED", 0), exp_log
    from safetensors.torch import load_file

    heads = load_file(str(out / "char_heads.safetensors"))["weight"]
    trained = _trainable_fp32(checkpoints, final)
    (head_key,) = [k for k in trained if k.startswith("char_heads")]
    assert torch.equal(heads, trained[head_key])


def test_two_node_usr1_requeues_and_resumes_like_uninterrupted(
    two_nodes, reference, tmp_path, tiny_llama, teacher_dataset, multinode_ds_config
):
    """USR1 mid-run on 2 nodes: every rank checkpoints, exit 75, requeue on 2 nodes, same end state."""
    ref_rec, ref_dir, ref_log, ref_trace = reference
    assert ref_rec.state == "COMPLETED", ref_log
    job, run_dir, log_path = _submit(
        two_nodes,
        tmp_path,
        "usr1",
        tiny_llama,
        teacher_dataset,
        multinode_ds_config,
        SPELLM_TEST_STEP_SLEEP="1",
    )
    two_nodes.wait(job, timeout=300, until=_until_step(tmp_path / "usr1-trace" / "rank2.tsv", 2))
    two_nodes.run(["scancel", "--signal=USR1", "--batch", job])
    (rec,) = two_nodes.wait(job, timeout=400)
    log = _read(log_path)
    assert (rec.state, rec.exit_code, rec.restarts, rec.fields["NodeList"]) == (
        "COMPLETED",
        0,
        1,
        "node[1-2]",
    ), log
    assert "training step exited with code 75" in log and f"job {job} restart 1" in log, log
    assert re.search(r"resumed from \S*step_0000000[2-5] at step [2-5]; world size 4", log), log
    final = f"step_{TRAIN_STEPS:08d}"
    ref_meta = json.loads((ref_dir / "checkpoints" / final / "spellm_meta.json").read_text())
    meta = json.loads((run_dir / "checkpoints" / final / "spellm_meta.json").read_text())
    for key in ("step", "samples_seen", "tokens_seen", "world_size"):
        assert meta[key] == ref_meta[key], key
    assert _trace(tmp_path / "usr1-trace") == _trace(ref_trace)
    ref_params = _trainable_fp32(ref_dir / "checkpoints", final)
    params = _trainable_fp32(run_dir / "checkpoints", final)
    assert params.keys() == ref_params.keys() and len(params) > 1
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=0, atol=1e-6, msg=name)


def test_checkpoint_dir_read_only_on_one_node(
    two_nodes, tmp_path, tiny_llama, teacher_dataset, multinode_ds_config
):
    """Checkpoint dir read-only on node2 only: a clear error naming it, no `latest`, no requeue."""
    checkpoints = tmp_path / "ro" / "checkpoints"
    checkpoints.mkdir(parents=True)
    two_nodes.read_only_on("node2", checkpoints)
    try:
        job, _, log_path = _submit(
            two_nodes, tmp_path, "ro", tiny_llama, teacher_dataset, multinode_ds_config
        )
        (rec,) = two_nodes.wait(job, timeout=300)
    finally:
        two_nodes.writable_again_on("node2", checkpoints)
    log = _read(log_path)
    assert (rec.state, rec.exit_code, rec.restarts) == ("FAILED", 2, 0), log
    assert f"checkpoint directory {checkpoints} is not writable from every rank" in log, log
    assert re.search(r"rank 2 on node2: Read-only file system; rank 3 on node2: Read-only", log), log
    assert "rank 0 on" not in log and "requeue" not in log, log
    assert not (checkpoints / "latest").exists() and list(checkpoints.iterdir()) == []


def _segments(lines: list[str]) -> list[list[tuple[int, list[int]]]]:
    """Split a rank's trace into the runs of one process each (a new run starts where the step drops)."""
    runs: list[list[tuple[int, list[int]]]] = []
    last = None
    for line in lines:
        step, idx = line.split("\t")
        if last is None or int(step) < last:
            runs.append([])
        runs[-1].append((int(step), [int(i) for i in idx.split(",") if i]))
        last = int(step)
    return runs


def test_node_death_requeue_shrunk_to_survivor_resumes_universal(
    two_nodes, reference, tmp_path, tiny_llama, teacher_dataset, multinode_ds_config
):
    """node2 dies mid-run: SLURM requeues the job; shrunk to node1 it resumes at world size 2 (universal)."""
    ref_rec, ref_dir, ref_log, ref_trace = reference
    assert ref_rec.state == "COMPLETED", ref_log
    job, run_dir, log_path = _submit(
        two_nodes,
        tmp_path,
        "death",
        tiny_llama,
        teacher_dataset,
        multinode_ds_config,
        SPELLM_TEST_STEP_SLEEP="1",
        # srun must outlast SLURM's verdict on the silent node (here ~30 s): had it given up first, the
        # batch script would end with the ranks' error and the job would fail instead of being requeued
        TASK_EXIT_WAIT="120",
    )
    checkpoints = run_dir / "checkpoints"
    traces = [tmp_path / "death-trace" / f"rank{r}.tsv" for r in range(NODES * PER_NODE)]
    try:
        # every rank has drawn step 5: step 3 is saved, the next save (step 6) is seconds away
        two_nodes.wait(job, timeout=300, until=lambda js: all(_until_step(t, 5)(js) for t in traces))
        two_nodes.kill_processes("node2")  # slurmd, step daemons and ranks: the node lost power
        # SLURM finds node2 silent, declares it DOWN, cancels the job for the node failure, requeues it
        (requeued,) = two_nodes.wait(
            job,
            timeout=180,
            until=lambda js: js and (js[0].done or (js[0].restarts, js[0].state) == (1, "PENDING")),
        )
        assert (requeued.state, requeued.restarts) == ("PENDING", 1), _read(log_path)
        two_nodes.wait_nodes("down", nodes=["node2"], timeout=60)
        # ... with its two-node request: it waits for node2
        (pending,) = two_nodes.wait(
            job, timeout=60, until=lambda js: js and js[0].fields.get("Reason") not in ("BeginTime", "None")
        )
        assert pending.state == "PENDING" and pending.fields["NumNodes"] == "2", pending.fields
        assert re.search(r"node2|DOWN", pending.fields["Reason"]), pending.fields["Reason"]
        last = (checkpoints / "latest").read_text().strip()
        # the operator shrinks the pending job to the surviving node (nodes, tasks, CPUs)
        two_nodes.run(
            [
                "scontrol",
                "update",
                f"JobId={job}",
                "NumNodes=1",
                f"NumTasks={PER_NODE}",
                f"NumCPUs={PER_NODE}",
            ]
        )
        (rec,) = two_nodes.wait(job, timeout=300)
    finally:
        two_nodes.start_slurmd("node2")  # back for whatever runs after this test
        two_nodes.wait_nodes("idle", timeout=120)
    log = _read(log_path)
    assert (rec.state, rec.exit_code, rec.restarts, rec.fields["NodeList"]) == (
        "COMPLETED",
        0,
        1,
        "node1",
    ), log
    assert f"job {job} restart 1 on node1: 1 node(s) x 2 task(s)" in log, log
    # from the last complete checkpoint, converted once to the universal format for world size 2
    assert last == "step_00000003"
    assert f"resumed from {checkpoints / last} (universal) at step 3; world size 2" in log, log
    assert (checkpoints / "universal" / last / ".complete").is_file()
    final = f"step_{TRAIN_STEPS:08d}"
    assert (checkpoints / "latest").read_text().strip() == final
    meta = json.loads((checkpoints / final / "spellm_meta.json").read_text())
    ref_meta = json.loads((ref_dir / "checkpoints" / final / "spellm_meta.json").read_text())
    for key in ("step", "samples_seen", "tokens_seen"):
        assert meta[key] == ref_meta[key], key
    assert (meta["world_size"], ref_meta["world_size"]) == (PER_NODE, NODES * PER_NODE)
    # exactly once: steps 1-3 of the first run (4 ranks, as in the reference) and 4-6 of the resumed one
    runs = {name: _segments(lines) for name, lines in _trace(tmp_path / "death-trace").items()}
    first = [b for segs in runs.values() for s, b in segs[0] if s <= 3]
    resumed = [b for name in ("rank0.tsv", "rank1.tsv") for s, b in runs[name][-1]]
    ref_first = [b for lines in _trace(ref_trace).values() for s, b in _segments(lines)[0] if s <= 3]
    assert sorted(map(tuple, first)) == sorted(map(tuple, ref_first))
    assert len(runs["rank0.tsv"]) == 2 and runs["rank0.tsv"][-1][0][0] == 4, runs["rank0.tsv"]
    consumed = [i for b in first + resumed for i in b]
    assert len(consumed) == len(set(consumed)) == ref_meta["samples_seen"]
    # parameters after the world-size change: not bit-equal to the reference, but finite, and they export
    trained = _trainable_fp32(checkpoints, final)
    assert len(trained) > 1 and all(torch.isfinite(t).all() for t in trained.values())
    out = tmp_path / "export"
    exp_job = two_nodes.sbatch(
        SLURM_DIR / "export.sh",
        f"--ntasks-per-node={PER_NODE}",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        env=_job_env(CHECKPOINT=str(checkpoints), OUTPUT=str(out)),
        cwd=REPO_ROOT,
    )
    (exp,) = two_nodes.wait(exp_job, timeout=240)
    assert (exp.state, exp.exit_code) == ("COMPLETED", 0), _read(tmp_path / f"spellm-export-{exp_job}.out")
    from spellm_ds.inference import SpeLLMForCausalLM

    model = SpeLLMForCausalLM.from_pretrained(out, dtype=torch.float32)
    (head_key,) = [k for k in trained if k.startswith("char_heads")]
    assert torch.equal(model.model.char_heads.weight.detach(), trained[head_key])
