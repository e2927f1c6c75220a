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
from pathlib import Path

import pytest
import slurm_jobs as jobs
import torch
from conftest import REPO_ROOT
from slurm_cluster import NetnsSlurmCluster, netns_unavailable

from spellm_ds.dist import check_hpz_fits_node
from spellm_ds.errors import SpellmError

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
    yield from jobs.cluster_session(
        "two-node SLURM",
        netns_unavailable(),
        "spellm-slurm2-",
        lambda workdir: NetnsSlurmCluster(workdir, nodes=NODES, cpus=PER_NODE),
    )


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


@pytest.fixture(scope="module")
def submit(two_nodes, tiny_llama, teacher_dataset, multinode_ds_config):
    """`submit(tmp, name, **env)`: distill_70b.sh on 2 nodes x 2 ranks, the tiny recipe on the multinode
    DeepSpeed config; returns (job id, run dir, log path)."""

    def submit_job(tmp: Path, name: str, **env: str) -> tuple[str, Path, Path]:
        return jobs.submit_distill(
            two_nodes,
            tmp,
            name,
            tiny_llama,
            teacher_dataset,
            TWO_NODE_JOB,
            {"batch.micro": 2, "deepspeed": multinode_ds_config},
            **{"LOG_VERSIONS": "0", "TASK_EXIT_WAIT": "20", **env},
        )

    return submit_job


@pytest.fixture(scope="module")
def reference(two_nodes, submit, tmp_path_factory):
    """distill_70b.sh on 2 nodes x 2 ranks, never interrupted: (job record, run dir, log, trace dir)."""
    return jobs.finished_run(two_nodes, submit(tmp_path_factory.mktemp("distill2"), "ref"), timeout=400)


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
    # a whole node per task: the two tasks land on different nodes
    tasks, logs, out = jobs.build_shards_array(
        two_nodes, tmp_path, tiny_llama, build_inputs, cpus_per_task=PER_NODE
    )
    assert sorted(t.fields["NodeList"] for t in tasks) == ["node1", "node2"], logs
    assert sorted(re.findall(r"task\(s\) on (node\d)", logs)) == ["node1", "node2"], logs
    jobs.assert_same_shards(out, teacher_dataset)


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
    assert f"step {jobs.TRAIN_STEPS}:" in log and "world size 4" in log, log
    # the secondary partitions DeepSpeed built: one per node, exactly that node's ranks
    assert "hpZ secondary partitions of 2 ranks: [0, 1] on node1; [2, 3] on node2" in log, log
    checkpoints = jobs.assert_checkpoints(run_dir)
    # every rank of both nodes wrote its ZeRO partition into the shared checkpoint directory
    assert len(list((checkpoints / jobs.FINAL).glob("*optim_states.pt"))) == NODES * PER_NODE

    out = jobs.export(two_nodes, tmp_path, checkpoints, ntasks=PER_NODE)
    jobs.assert_exported_heads(out, checkpoints)


def test_two_node_usr1_requeues_and_resumes_like_uninterrupted(two_nodes, reference, submit, tmp_path):
    """USR1 mid-run on 2 nodes: every rank checkpoints, exit 75, requeue on 2 nodes, same end state."""
    ref_dir, ref_trace = jobs.completed(reference)
    job, run_dir, log_path = submit(tmp_path, "usr1", SPELLM_TEST_STEP_SLEEP="1")
    two_nodes.wait(job, timeout=300, until=jobs.until_step(tmp_path / "usr1-trace" / "rank2.tsv", 2))
    two_nodes.run(["scancel", "--signal=USR1", "--batch", job])
    (rec,) = two_nodes.wait(job, timeout=400)
    log = jobs.read_log(log_path)
    assert (rec.state, rec.exit_code, rec.restarts, rec.fields["NodeList"]) == (
        "COMPLETED",
        0,
        1,
        "node[1-2]",
    ), log
    assert "training step exited with code 75" in log and f"job {job} restart 1" in log, log
    assert re.search(r"resumed from \S*step_0000000[2-5] at step [2-5]; world size 4", log), log
    counters = ("step", "samples_seen", "tokens_seen", "world_size")
    jobs.assert_finished_like(run_dir, tmp_path / "usr1-trace", ref_dir, ref_trace, counters)


def test_checkpoint_dir_read_only_on_one_node(two_nodes, submit, tmp_path):
    """Checkpoint dir read-only on node2 only: a clear error naming it, no `latest`, no requeue."""
    checkpoints = tmp_path / "ro" / "checkpoints"
    checkpoints.mkdir(parents=True)
    two_nodes.read_only_on("node2", checkpoints)
    try:
        job, _, log_path = submit(tmp_path, "ro")
        (rec,) = two_nodes.wait(job, timeout=300)
    finally:
        two_nodes.writable_again_on("node2", checkpoints)
    log = jobs.read_log(log_path)
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


def test_node_death_requeue_shrunk_to_survivor_resumes_universal(two_nodes, reference, submit, tmp_path):
    """node2 dies mid-run: SLURM requeues the job; shrunk to node1 it resumes at world size 2 (universal)."""
    ref_dir, ref_trace = jobs.completed(reference)
    job, run_dir, log_path = submit(
        tmp_path,
        "death",
        SPELLM_TEST_STEP_SLEEP="1",
        # srun must outlast SLURM's verdict on the silent node (here ~30 s): had it given up first, the
        # batch script would end with the ranks' error and the job would fail instead of being requeued
        TASK_EXIT_WAIT="120",
    )
    checkpoints = run_dir / "checkpoints"
    traces = [tmp_path / "death-trace" / f"rank{r}.tsv" for r in range(NODES * PER_NODE)]
    try:
        # every rank has drawn step 5: step 3 is saved, the next save (step 6) is seconds away
        two_nodes.wait(job, timeout=300, until=lambda js: all(jobs.until_step(t, 5)(js) for t in traces))
        two_nodes.kill_processes("node2")  # slurmd, step daemons and ranks: the node lost power
        # SLURM finds node2 silent, declares it DOWN, cancels the job for the node failure, requeues it
        (requeued,) = two_nodes.wait(
            job,
            timeout=180,
            until=lambda js: js and (js[0].done or (js[0].restarts, js[0].state) == (1, "PENDING")),
        )
        assert (requeued.state, requeued.restarts) == ("PENDING", 1), jobs.read_log(log_path)
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
    log = jobs.read_log(log_path)
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
    assert (checkpoints / "latest").read_text().strip() == jobs.FINAL
    meta, ref_meta = jobs.assert_same_counters(run_dir, ref_dir, ("step", "samples_seen", "tokens_seen"))
    assert (meta["world_size"], ref_meta["world_size"]) == (PER_NODE, NODES * PER_NODE)
    # exactly once: steps 1-3 of the first run (4 ranks, as in the reference) and 4-6 of the resumed one
    runs = {name: _segments(lines) for name, lines in jobs.trace(tmp_path / "death-trace").items()}
    first = [b for segs in runs.values() for s, b in segs[0] if s <= 3]
    resumed = [b for name in ("rank0.tsv", "rank1.tsv") for s, b in runs[name][-1]]
    ref_first = [b for lines in jobs.trace(ref_trace).values() for s, b in _segments(lines)[0] if s <= 3]
    assert sorted(map(tuple, first)) == sorted(map(tuple, ref_first))
    assert len(runs["rank0.tsv"]) == 2 and runs["rank0.tsv"][-1][0][0] == 4, runs["rank0.tsv"]
    consumed = [i for b in first + resumed for i in b]
    assert len(consumed) == len(set(consumed)) == ref_meta["samples_seen"]
    # parameters after the world-size change: not bit-equal to the reference, but finite, and they export
    trained = jobs.trainable_fp32(checkpoints, jobs.FINAL)
    assert len(trained) > 1 and all(torch.isfinite(t).all() for t in trained.values())
    out = jobs.export(two_nodes, tmp_path, checkpoints, ntasks=PER_NODE)
    from spellm_ds.inference.model import SpeLLMForCausalLM

    model = SpeLLMForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.model.char_heads.weight.detach(), trained[jobs.head_key(trained)])
