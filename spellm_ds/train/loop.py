"""The distillation trainer: DeepSpeed ZeRO-3, periodic eval, exact resume, preemption, TensorBoard.

`train(config) -> exit code`. One code path for CPU ranks (gloo) and GPUs (NCCL); rank and world size
come from whatever launched the process (`spellm_ds.dist.detect`: torchrun, the deepspeed launcher,
mpirun, srun, or a plain single process).

Exit codes (`spellm-ds train` returns them as its process exit status):

    0   EXIT_OK           max_steps reached; a final checkpoint is written
    2   (CLI)             bad input: config, files, charset/tokenizer/shard mismatch, batch identity;
                          reported before any process group is created
    3   EXIT_NONFINITE    `max_consecutive_nonfinite` micro-batches in a row had a non-finite loss
    75  EXIT_INTERRUPTED  SIGUSR1 or SIGTERM: every rank saved a complete checkpoint at the next step
                          boundary; run the same command again (resume: auto) to continue. 75 is
                          EX_TEMPFAIL from sysexits.h, "try again later": the code a requeue script keys on.

Signals reach the ranks from srun (every task) and Open MPI's mpirun (forwards SIGUSR1), so their
exit status is 75. torchrun forwards SIGTERM (SIGUSR1 would end torchrun itself): the ranks still save
and exit 75, but torchrun's own status is 1, so a requeue script launches ranks with srun (as
slurm/distill_70b.sh does) or reads `latest`. Handlers are installed before the model loads.

Around the loop: `spellm_ds.train.setup` builds the run (`Run`: engine, loaders, char table, lookup,
tokenizer) and restores a checkpoint, `spellm_ds.train.schedule` gives each step's learning rate,
`spellm_ds.train.signals` turns SIGUSR1/SIGTERM into a flag, and `spellm_ds.train.report` writes the
progress lines, TensorBoard scalars and periodic eval.

Checkpoints: `spellm_ds.train.checkpoint` owns the layout (tags, `latest`, metadata, pruning, the
complete-or-invisible save, universal conversion, RNG states); the trainer decides what goes in (step
counters, the merged data-loader state with its consumed-sample bitmap ORed over ranks, the resolved
config, the charset and tokenizer hashes). `resume: auto` resumes from the checkpoint `latest` names.

Resume at another world size: the checkpoint is converted once to DeepSpeed's universal format (into
`<checkpoint dir>/universal/<tag>`) and loaded with `checkpoint.load_universal`; parameters and optimizer
state carry over, the data loader re-plans the rest of the epoch for the new world size, and RNG states
restart from the seed.

Non-finite loss: the loss of every micro-batch is checked on all ranks (one all-reduce) before
`engine.backward`; a non-finite micro-batch is dropped (no backward, no optimizer step; its samples count
as consumed), counted in `train/skipped_nonfinite`, and the optimizer step waits for `grad_accum` finite
micro-batches. After `max_consecutive_nonfinite` in a row the run stops with exit code 3.

TensorBoard (rank 0, `<run_dir>/tensorboard` unless set): `train/*` (loss, char_loss, reg_loss, every
metric of `losses.char_metrics`, fallback_top1, lr, grad_norm, skipped_nonfinite; losses and metrics are
means over the step's micro-batches and the ranks), `eval/*` (the same, weighted by loss positions) and
`eval/samples` (decoded student vs teacher tokens), `throughput/tokens_per_s`,
`progress/{samples_seen,tokens_seen,epoch}`, `time/{data_wait_s,compute_s,step_s}`,
`memory/{rss_mb,max_rss_mb}` on CPU or `memory/{cuda_max_allocated_mb,cuda_allocated_mb}` on GPU,
`data/corrupt_samples`, and the resolved config as text and hparams. A resumed run purges the events a
crashed run logged after its checkpoint.

Callbacks (`spellm_ds.train.callbacks`; the run config's `callbacks` names them, none in normal runs):
every rank calls them at fixed points of the loop, the first three in this order for each micro-batch:

    on_samples        a training micro-batch was drawn (its optimizer step, this rank's count of
                      micro-batches drawn, its sample indices)
    on_teacher_topk   teacher: online: the online teacher's top-k of that training micro-batch
    on_loss           its loss was computed, before the all-rank finite check; the loss returned is
                      the one checked and trained on
    on_step           after an optimizer step, its logging, eval and checkpoint
    close             when the run ends

The tests plug fault injection and tracing in here (`tests/fault_injection.py`, driven by environment
variables): NaN losses at chosen micro-batches (`on_loss`), SIGKILL of every rank right after a step and
a sleep after every step (`on_step`), and each rank's sample indices per micro-batch and the online
teacher's top-k (`on_samples`, `on_teacher_topk`), which the exactly-once accounting and the
online-teacher tests check.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from spellm_ds import dist as dist_env
from spellm_ds.config.preflight import preflight
from spellm_ds.config.run import TrainConfig
from spellm_ds.errors import EveryRankError
from spellm_ds.train import checkpoint as ckpt
from spellm_ds.train.callbacks import Callback, load_callbacks
from spellm_ds.train.report import StepStats, evaluate, log_start, log_train, say, terms
from spellm_ds.train.schedule import lr_at
from spellm_ds.train.setup import Run, TrainState, restore, resume_target_of, setup, warm_start_run
from spellm_ds.train.signals import StopFlag

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75


class NonFiniteError(Exception):
    """Too many consecutive micro-batches with a non-finite loss."""


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> int:
    """Run (or resume) a distillation run described by `cfg`; return the process exit code."""
    from spellm_ds.dist import detect

    stop = StopFlag().install()  # first: a signal during a long model load must not kill the rank
    callbacks: Callback = Callback()
    try:
        info = detect()
        pre = preflight(cfg, info.world_size)  # bad input stops here, before any process group
        callbacks = load_callbacks(cfg.callbacks, info.rank)
        resume = resume_target_of(cfg)
        run = setup(cfg, pre, info, resume, callbacks)
    except BaseException as exc:
        stop.restore()
        callbacks.close()
        dist_env.leave_process_group(clean=isinstance(exc, EveryRankError))
        raise
    clean = False
    try:
        state = restore(run, resume)
        log_start(run, state, resume)
        if state.step == 0 and resume is None and cfg.warm_start.positions:
            warm_start_run(run)
        if state.step == 0 and cfg.checkpoint.save_at_start:
            _save(run, state)  # the starting point (warm-started heads) that training is measured against
        while state.step < cfg.max_steps:
            if _any_rank(run, stop.signum != 0):
                _save(run, state)
                say(f"signal received: saved {ckpt.tag_for(state.step)}; exiting {EXIT_INTERRUPTED}")
                clean = True
                return EXIT_INTERRUPTED
            stats = _train_step(run, state)
            if state.step % cfg.log_interval == 0 or state.step == cfg.max_steps:
                log_train(run, state, stats)
            if cfg.eval.interval and (state.step % cfg.eval.interval == 0 or state.step == cfg.max_steps):
                evaluate(run, state)
            if state.step % cfg.checkpoint.interval == 0 or state.step == cfg.max_steps:
                _save(run, state)
            run.callbacks.on_step(state.step)
        say(f"done: {state.step} steps, {state.tokens_seen} tokens, {state.skipped_nonfinite} skipped")
        clean = True
        return EXIT_OK
    except NonFiniteError as exc:  # raised on every rank at once (the loss check is all-reduced)
        say(f"error: {exc}")
        clean = True
        return EXIT_NONFINITE
    finally:
        stop.restore()
        _teardown(run, clean)


def _teardown(run: Run, clean: bool) -> None:
    """Close callbacks and files; after a clean end wait for every rank, then leave the process group."""
    run.callbacks.close()
    if run.writer is not None:
        run.writer.close()
    dist_env.leave_process_group(clean)


# ---------------------------------------------------------------------------------------------------
# One optimizer step


def _any_rank(run: Run, flag: bool) -> bool:
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _train_step(run: Run, state: TrainState) -> StepStats:
    """Draw micro-batches until `grad_accum` finite ones went through backward, then step the optimizer."""
    cfg, engine = run.cfg, run.engine
    assert run.batches is not None  # started by `restore`
    lr = lr_at(state.step, cfg)
    for group, (_, scale) in zip(engine.optimizer.param_groups, run.lr_groups):
        group["lr"] = lr * scale
    log_now = (state.step + 1) % cfg.log_interval == 0 or state.step + 1 == cfg.max_steps
    t0 = time.perf_counter()
    wait, accepted, tokens = 0.0, 0, 0
    names: list[str] = []
    sums: torch.Tensor | None = None
    while accepted < run.pre.grad_accum:
        t = time.perf_counter()
        batch = run.to_device(next(run.batches))
        wait += time.perf_counter() - t
        state.batches += 1
        state.samples_seen += run.pre.micro * run.world_size
        state.tokens_seen += run.pre.micro * cfg.data.seq_len * run.world_size
        tokens += run.pre.micro * cfg.data.seq_len * run.world_size
        run.callbacks.on_samples(state.step + 1, state.batches, batch["sample_index"])
        out = run.forward(batch, with_metrics=log_now)
        loss = run.callbacks.on_loss(state.batches, out.loss)
        if _any_rank(run, not bool(torch.isfinite(loss.detach()).item())):
            _skip_nonfinite(run, state)
            continue
        state.consecutive_nonfinite = 0
        engine.backward(loss)
        engine.step()
        accepted += 1
        if log_now:
            found = terms(out)
            names = sorted(found)
            vec = torch.stack([found[n].detach().float() for n in names])
            sums = vec if sums is None else sums + vec
    state.step += 1
    norm = engine.get_global_grad_norm()
    return StepStats(
        terms=dict(zip(names, sums.tolist())) if sums is not None else {},
        count=accepted,
        data_wait=wait,
        wall=time.perf_counter() - t0,
        tokens=tokens,
        grad_norm=float(norm) if norm is not None else float("nan"),
        lr=lr,
    )


def _skip_nonfinite(run: Run, state: TrainState) -> None:
    state.skipped_nonfinite += 1
    state.consecutive_nonfinite += 1
    say(f"step {state.step + 1}: non-finite loss, micro-batch {state.batches} skipped")
    if state.consecutive_nonfinite >= run.cfg.max_consecutive_nonfinite:
        raise NonFiniteError(
            f"{state.consecutive_nonfinite} micro-batches in a row had a non-finite loss "
            f"(max_consecutive_nonfinite={run.cfg.max_consecutive_nonfinite}) at step {state.step + 1}; "
            "lower optim.lr, check the data, or resume from an earlier checkpoint"
        )


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def _save(run: Run, state: TrainState) -> None:
    """Collective: checkpoint this exact state (once) through `spellm_ds.train.checkpoint`."""
    from spellm_ds.data.loader import all_gather_state

    if run.saved_step == state.step:
        return  # this exact state is already a complete checkpoint (never rewrite what `latest` names)
    client = {
        "state": vars(state).copy(),
        "data": all_gather_state(run.loader),
        "config": run.cfg.to_dict(),
        "charset_hash": run.table.hash,
        "tokenizer_hash": run.pre.tokenizer_hash,
        "teacher": run.cfg.teacher,
    }
    meta = {
        "tokens_seen": state.tokens_seen,
        "samples_seen": state.samples_seen,
        "charset_hash": run.table.hash,
        "tokenizer_hash": run.pre.tokenizer_hash,
        "model_path": str(Path(run.cfg.model.path).resolve()),
        "trainable_layers": run.cfg.model.trainable_layers,
        "k": run.cfg.model.k,
        "teacher": run.cfg.teacher,
        "config": run.cfg.to_dict(),
    }
    ckpt.save_checkpoint(
        run.engine,
        run.cfg.checkpoint_dir,
        state.step,
        client=client,
        meta=meta,
        table=run.table,
        keep=run.cfg.checkpoint.keep_latest_k,
        rank=run.rank,
        world_size=run.world_size,
    )
    run.saved_step = state.step
