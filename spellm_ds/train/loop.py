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

Fault-injection hooks for tests (environment variables, read at start; unset in normal runs):

    SPELLM_TEST_NAN_BATCHES=3,4     micro-batches (1-based count of batches drawn) whose loss is NaN
    SPELLM_TEST_KILL_AT_STEP=5      every rank SIGKILLs itself right after optimizer step 5
    SPELLM_TEST_STEP_SLEEP=0.2      sleep this many seconds after every optimizer step
    SPELLM_TRACE_SAMPLES=DIR        each rank appends "step<TAB>sample indices" per micro-batch to
                                    DIR/rank<R>.tsv (the exactly-once accounting the tests check)
    SPELLM_TRACE_TEACHER=DIR        teacher: online only: each rank saves the sample indices and the
                                    online teacher's top-k of every training micro-batch to
                                    DIR/rank<R>_<count>.npz (compared with teacher shards by the tests)
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spellm_ds import dist as dist_env
from spellm_ds.config.run import Preflight, TrainConfig, fill_ds_config, preflight
from spellm_ds.errors import EveryRankError, SpellmError
from spellm_ds.log import ALL_RANKS, get_logger
from spellm_ds.train import checkpoint as ckpt
from spellm_ds.train import monitor

_LOG = get_logger("train")
EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Return the learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    peak, low = cfg.optim.lr, cfg.schedule.min_lr
    warm = cfg.schedule.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    span = max(1, cfg.max_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return low + 0.5 * (peak - low) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------
# Resume checks


def _resume_target(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run resumes from (`train.checkpoint.resume_target`), of this teacher mode."""
    return _check_teacher_mode(cfg, ckpt.resume_target(cfg.checkpoint_dir, cfg.checkpoint.resume))


def _check_teacher_mode(cfg: TrainConfig, checkpoint: Path | None) -> Path | None:
    """Refuse to resume a checkpoint of the other teacher mode (the models hold different parameters)."""
    if checkpoint is None:
        return None
    saved = ckpt.read_meta(checkpoint).get("teacher", "offline")  # checkpoints without the field are offline
    if saved != cfg.teacher:
        raise SpellmError(
            f"checkpoint {checkpoint} was trained with teacher: {saved}, this config has "
            f"teacher: {cfg.teacher}; "
            "an online model also holds the frozen original MLPs, so the modes do not resume each other: "
            f"set teacher={saved} to continue it, or start a new run (another run_dir or checkpoint.dir)"
        )
    return checkpoint


# ---------------------------------------------------------------------------------------------------
# Run state


@dataclass
class TrainState:
    """Counters that a checkpoint restores."""

    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches drawn (skipped ones included)
    samples_seen: int = 0  # sequences drawn, all ranks
    tokens_seen: int = 0  # tokens drawn, all ranks
    skipped_nonfinite: int = 0  # micro-batches dropped for a non-finite loss
    consecutive_nonfinite: int = 0


@dataclass
class Run:
    """Everything the loop needs, built once by `_setup`."""

    cfg: TrainConfig
    pre: Preflight
    rank: int
    world_size: int
    device: torch.device
    engine: Any
    table: Any
    lookup: Any
    tokenizer: Any
    loader: Any
    batches: Any = None  # the training batch iterator
    eval_loader: Any = None
    writer: Any = None
    universal: bool = False
    # ZeRO++ hpZ: [(ranks, hosts)] of every secondary-partition group DeepSpeed built (empty when off)
    hpz_groups: list[tuple[list[int], list[str]]] = field(default_factory=list)
    saved_step: int = -1  # step of the newest checkpoint this process wrote or resumed from
    corrupt_at_start: int = 0  # corrupt samples counted before this process started (all ranks)
    trace: Any = None
    hooks: dict[str, Any] = field(default_factory=dict)
    # (name, lr multiple) of each optimizer group, in order. Kept here, not in the groups: a universal
    # checkpoint load copies group 0's hyperparameters into every group.
    lr_groups: list[tuple[str, float]] = field(default_factory=list)


class NonFiniteError(Exception):
    """Too many consecutive micro-batches with a non-finite loss."""


class _StopFlag:
    """SIGUSR1/SIGTERM only set a flag; ranks agree on it at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> _StopFlag:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _read_hooks() -> dict[str, Any]:
    env = os.environ
    nan = {int(x) for x in env.get("SPELLM_TEST_NAN_BATCHES", "").split(",") if x.strip()}
    return {
        "nan_batches": nan,
        "kill_at_step": int(env.get("SPELLM_TEST_KILL_AT_STEP", "0") or 0),
        "step_sleep": float(env.get("SPELLM_TEST_STEP_SLEEP", "0") or 0),
        "trace_dir": env.get("SPELLM_TRACE_SAMPLES") or None,
        "teacher_dir": env.get("SPELLM_TRACE_TEACHER") or None,
        "teacher_count": 0,
    }


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> int:
    """Run (or resume) a distillation run described by `cfg`; return the process exit code."""
    from spellm_ds.dist import detect

    stop = _StopFlag().install()  # first: a signal during a long model load must not kill the rank
    try:
        info = detect()
        pre = preflight(cfg, info.world_size)  # bad input stops here, before any process group
        resume = _resume_target(cfg)
        run = _setup(cfg, pre, info, resume)
    except BaseException as exc:
        stop.restore()
        dist_env.leave_process_group(clean=isinstance(exc, EveryRankError))
        raise
    clean = False
    try:
        state = _restore(run, resume)
        _log_start(run, state, resume)
        if state.step == 0 and resume is None and cfg.warm_start.positions:
            _warm_start(run)
        if state.step == 0 and cfg.checkpoint.save_at_start:
            _save(run, state)  # the starting point (warm-started heads) that training is measured against
        while state.step < cfg.max_steps:
            if _any_rank(run, stop.signum != 0):
                _save(run, state)
                _say(f"signal received: saved {ckpt.tag_for(state.step)}; exiting {EXIT_INTERRUPTED}")
                clean = True
                return EXIT_INTERRUPTED
            stats = _train_step(run, state)
            if state.step % cfg.log_interval == 0 or state.step == cfg.max_steps:
                _log_train(run, state, stats)
            if cfg.eval.interval and (state.step % cfg.eval.interval == 0 or state.step == cfg.max_steps):
                _evaluate(run, state)
            if state.step % cfg.checkpoint.interval == 0 or state.step == cfg.max_steps:
                _save(run, state)
            _fault_hooks(run, state)
        _say(f"done: {state.step} steps, {state.tokens_seen} tokens, {state.skipped_nonfinite} skipped")
        clean = True
        return EXIT_OK
    except NonFiniteError as exc:  # raised on every rank at once (the loss check is all-reduced)
        _say(f"error: {exc}")
        clean = True
        return EXIT_NONFINITE
    finally:
        stop.restore()
        _teardown(run, clean)


# ---------------------------------------------------------------------------------------------------
# Setup


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _setup(cfg: TrainConfig, pre: Preflight, info: Any, resume: Path | None) -> Run:
    import deepspeed
    from transformers import AutoTokenizer

    from spellm_ds.charset import CharTable, TokenLookup
    from spellm_ds.dist import device_and_backend, export_torch_env

    # ZeRO-3 calls torch's renamed collectives on every step, and torch warns at every call.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    dist_env.check_hpz_fits_node(cfg.deepspeed, pre.ds_config, info.local_world_size)
    device_name, backend = device_and_backend(info)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    export_torch_env(info)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    ckpt.check_writable_everywhere(cfg.checkpoint_dir, info.rank)
    _seed_all(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    if cfg.model.charset:
        table = CharTable.load(cfg.model.charset)
    else:
        table = CharTable.build(tokenizer, k=cfg.model.k, vocab_size=_model_vocab(cfg))
    universal = resume is not None and int(ckpt.read_meta(resume)["world_size"]) != info.world_size
    ds_config = fill_ds_config(pre.ds_config, cfg, pre)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    model = _build_model(cfg, table, ds_config)
    groups = model.param_groups(cfg.optim.mlp_lr_scale)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    hpz_groups = dist_env.hpz_layout()
    run = Run(
        cfg=cfg,
        pre=pre,
        rank=info.rank,
        world_size=info.world_size,
        device=device,
        engine=engine,
        table=table,
        lookup=TokenLookup(table, device),
        tokenizer=tokenizer,
        loader=_make_loader(cfg, pre, info.rank, info.world_size, cfg.data.train, train=True),
        eval_loader=(
            _make_loader(cfg, pre, info.rank, info.world_size, cfg.data.eval, train=False)
            if cfg.data.eval
            else None
        ),
        universal=universal,
        hooks=_read_hooks(),
        lr_groups=[(g["name"], g["lr_scale"]) for g in groups],
        hpz_groups=hpz_groups,
    )
    if run.hooks["trace_dir"]:
        trace = Path(run.hooks["trace_dir"])
        trace.mkdir(parents=True, exist_ok=True)
        run.trace = (trace / f"rank{run.rank}.tsv").open("a", encoding="utf-8")
    if run.hooks["teacher_dir"]:
        Path(run.hooks["teacher_dir"]).mkdir(parents=True, exist_ok=True)
    return run


def _model_vocab(cfg: TrainConfig) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(cfg.model.path).vocab_size)


def _build_model(cfg: TrainConfig, table: Any, ds_config: dict[str, Any]) -> torch.nn.Module:
    from spellm_ds.model.student import build_spellm_model

    model = build_spellm_model(
        cfg.model.path,
        k=cfg.model.k,
        num_chars=table.charset.size,
        trainable_layers=cfg.model.trainable_layers,
        dtype=cfg.model.dtype,
        ds_config=ds_config,
        online_teacher=cfg.teacher == "online",
    )
    model.set_loss(cfg.loss, table.token_chars, table.decodable)
    return model


def _make_loader(
    cfg: TrainConfig, pre: Preflight, rank: int, world_size: int, location: str, train: bool
) -> Any:
    from spellm_ds.data.loader import LoaderConfig, ShardLoader

    lc = LoaderConfig(
        location=location,
        batch_size=pre.micro,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        shuffle=train,
        partial=not train,
        equal_steps=True,
        skip_corrupt=cfg.data.skip_corrupt,
        read_retries=cfg.data.read_retries,
        read_timeout_s=cfg.data.read_timeout_s,
        tokenizer_hash=pre.tokenizer_hash,
        seq_len=cfg.data.seq_len,
    )
    return ShardLoader(lc, rank=rank, world_size=world_size)


def _teardown(run: Run, clean: bool) -> None:
    """Close files; after a clean end wait for every rank, then leave the process group."""
    if run.trace is not None:
        run.trace.close()
    if run.writer is not None:
        run.writer.close()
    dist_env.leave_process_group(clean)


def _say(text: str, always: bool = False) -> None:
    """Log a progress line (rank 0 only unless `always`)."""
    _LOG.info(text, extra=ALL_RANKS if always else None)


# ---------------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepStats:
    """Sums over the accepted micro-batches of one optimizer step."""

    terms: dict[str, float]
    count: int
    data_wait: float
    wall: float
    tokens: int
    grad_norm: float
    lr: float


def _any_rank(run: Run, flag: bool) -> bool:
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _trace(run: Run, step: int, batch: dict[str, torch.Tensor]) -> None:
    if run.trace is not None:
        idx = ",".join(str(int(i)) for i in batch["sample_index"].tolist())
        run.trace.write(f"{step}\t{idx}\n")
        run.trace.flush()


def _forward(run: Run, batch: dict[str, torch.Tensor], with_metrics: bool) -> Any:
    """Engine forward with the teacher tensors: the model computes loss and metrics inside (ZeRO-3 safe).

    Online, the model computes the teacher's top-k itself (the shards' are ignored, if they hold any).
    """
    if run.cfg.teacher == "online":
        out = run.engine(
            input_ids=batch["input_ids"],
            loss_mask=batch["loss_mask"],
            with_metrics=with_metrics,
            online_teacher=True,
        )
        _trace_teacher(run, batch, out)
        return out
    return run.engine(
        input_ids=batch["input_ids"],
        topk_ids=batch["topk_ids"],
        topk_logprobs=batch["topk_logprobs"],
        loss_mask=batch["loss_mask"],
        with_metrics=with_metrics,
    )


def _trace_teacher(run: Run, batch: dict[str, torch.Tensor], out: Any) -> None:
    """With `SPELLM_TRACE_TEACHER=DIR`: save the online teacher's top-k of every micro-batch on every rank."""
    trace = run.hooks["teacher_dir"]
    if not trace or not run.engine.module.training:  # training micro-batches only
        return
    run.hooks["teacher_count"] += 1
    path = Path(trace) / f"rank{run.rank}_{run.hooks['teacher_count']:06d}.npz"
    np.savez(
        path,
        sample_index=batch["sample_index"].cpu().numpy(),
        topk_ids=out.teacher_topk_ids.cpu().numpy(),
        topk_logprobs=out.teacher_topk_logprobs.cpu().numpy(),
    )


def _terms(out: Any) -> dict[str, torch.Tensor]:
    terms = {"loss": out.loss.detach()}
    terms.update(out.metrics or {})
    return terms


def _train_step(run: Run, state: TrainState) -> StepStats:
    """Draw micro-batches until `grad_accum` finite ones went through backward, then step the optimizer."""
    cfg, engine = run.cfg, run.engine
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
        batch = _to_device(next(run.batches), run.device)
        wait += time.perf_counter() - t
        state.batches += 1
        state.samples_seen += run.pre.micro * run.world_size
        state.tokens_seen += run.pre.micro * cfg.data.seq_len * run.world_size
        tokens += run.pre.micro * cfg.data.seq_len * run.world_size
        _trace(run, state.step + 1, batch)
        out = _forward(run, batch, with_metrics=log_now)
        loss = out.loss
        if state.batches in run.hooks["nan_batches"]:
            loss = loss * float("nan")
        if _any_rank(run, not bool(torch.isfinite(loss.detach()).item())):
            _skip_nonfinite(run, state)
            continue
        state.consecutive_nonfinite = 0
        engine.backward(loss)
        engine.step()
        accepted += 1
        if log_now:
            terms = _terms(out)
            names = sorted(terms)
            vec = torch.stack([terms[n].detach().float() for n in names])
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
    _say(f"step {state.step + 1}: non-finite loss, micro-batch {state.batches} skipped")
    if state.consecutive_nonfinite >= run.cfg.max_consecutive_nonfinite:
        raise NonFiniteError(
            f"{state.consecutive_nonfinite} micro-batches in a row had a non-finite loss "
            f"(max_consecutive_nonfinite={run.cfg.max_consecutive_nonfinite}) at step {state.step + 1}; "
            "lower optim.lr, check the data, or resume from an earlier checkpoint"
        )


def _fault_hooks(run: Run, state: TrainState) -> None:
    if run.hooks["step_sleep"]:
        time.sleep(run.hooks["step_sleep"])
    if run.hooks["kill_at_step"] and state.step == run.hooks["kill_at_step"]:
        if run.trace is not None:
            run.trace.flush()
        os.kill(os.getpid(), signal.SIGKILL)


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


def _restore(run: Run, resume: Path | None) -> TrainState:
    """Load the checkpoint `resume` (or start fresh); return the counters and start the batch stream."""
    state = TrainState()
    if resume is not None:
        saved = ckpt.load_checkpoint(
            run.engine,
            resume,
            universal_root=run.cfg.checkpoint_dir / ckpt.UNIVERSAL_DIR if run.universal else None,
            rank=run.rank,
            charset_hash=run.table.hash,
        )
        state = TrainState(**saved["state"])
        if resume.parent.resolve() == run.cfg.checkpoint_dir.resolve():
            run.saved_step = state.step  # already a complete checkpoint of this run
        run.loader.load_state_dict(saved["data"])
    run.corrupt_at_start = run.loader.corrupt_skipped
    run.batches = iter(run.loader)
    return state


# ---------------------------------------------------------------------------------------------------
# Logging and eval


def _open_writer(run: Run, state: TrainState) -> None:
    if run.rank == 0 and run.writer is None:
        run.writer = monitor.open_writer(run.cfg.tensorboard_dir, state.step)


def _log_start(run: Run, state: TrainState, resume: Path | None) -> None:
    _open_writer(run, state)
    trainable = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        for p in run.engine.module.parameters()
        if p.requires_grad
    )
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in run.engine.module.parameters())
    where = f"resumed from {resume}" + (" (universal)" if run.universal else "") if resume else "fresh start"
    _say(
        f"{where} at step {state.step}; world size {run.world_size}, micro {run.pre.micro} x accum "
        f"{run.pre.grad_accum} = batch {run.pre.train_batch}; trainable {trainable:,} of {total:,} params",
    )
    if run.hpz_groups:
        where = "; ".join(f"{ranks} on {hosts[0]}" for ranks, hosts in run.hpz_groups)
        _say(f"hpZ secondary partitions of {len(run.hpz_groups[0][0])} ranks: {where}")
    if run.writer is None:
        return
    flat = monitor.flatten(run.cfg.to_dict())
    flat.update(world_size=run.world_size, train_batch=run.pre.train_batch, grad_accum=run.pre.grad_accum)
    flat["trainable_params"] = trainable
    monitor.write_header(run.writer, run.cfg.to_yaml(), flat, state.step)


def _log_train(run: Run, state: TrainState, stats: StepStats) -> None:
    means = {name: total / max(1, stats.count) for name, total in stats.terms.items()}
    means["time/data_wait_s"] = stats.data_wait
    means["time/compute_s"] = stats.wall - stats.data_wait
    means["time/step_s"] = stats.wall
    means.update(monitor.memory_mb(run.device))
    # Every rank's count holds the merged total at the last resume plus its own since: sum the increments.
    means["data/corrupt_samples"] = float(run.loader.corrupt_skipped - run.corrupt_at_start)
    avg = monitor.mean_over_ranks(means, run.device, run.world_size)
    avg["data/corrupt_samples"] = avg["data/corrupt_samples"] * run.world_size + run.corrupt_at_start
    if run.writer is None:
        return
    scalars = {f"train/{k}" if "/" not in k else k: v for k, v in avg.items()}
    scalars.update(
        {
            "train/lr": stats.lr,
            **{
                f"train/lr_{name}": float(g["lr"])
                for g, (name, _) in zip(run.engine.optimizer.param_groups, run.lr_groups)
            },
            "train/grad_norm": stats.grad_norm,
            "train/skipped_nonfinite": float(state.skipped_nonfinite),
            "throughput/tokens_per_s": stats.tokens / max(stats.wall, 1e-9),
            "progress/samples_seen": float(state.samples_seen),
            "progress/tokens_seen": float(state.tokens_seen),
            "progress/epoch": float(run.loader.epoch),
        }
    )
    monitor.write_scalars(run.writer, scalars, state.step)
    if state.step == 1 or state.step % (10 * run.cfg.log_interval) == 0 or state.step == run.cfg.max_steps:
        _say(f"step {state.step}: loss {scalars.get('train/loss', float('nan')):.4f} lr {stats.lr:.3g}")


def _warm_start(run: Run) -> None:
    """Collective: fit the char heads on the first training positions before step 0 (see warm_start)."""
    from spellm_ds.train.warm_start import warm_start_heads

    cfg = run.cfg
    per_batch = run.pre.micro * cfg.data.seq_len * run.world_size
    n_batches = max(1, -(-cfg.warm_start.positions // per_batch))
    loader = _make_loader(cfg, run.pre, run.rank, run.world_size, cfg.data.train, train=False)
    loader.start_epoch(0)

    def batches() -> Any:
        for i, batch in enumerate(loader.iter_epoch()):
            if i >= n_batches:
                return
            yield _to_device(batch, run.device)

    t0 = time.perf_counter()
    run.engine.eval()
    fit = warm_start_heads(
        run.engine,
        run.engine.module,
        batches(),
        iters=cfg.warm_start.iters,
        l2=cfg.warm_start.l2,
        online=cfg.teacher == "online",
    )
    # The optimizer's fp32 master partitions were copied at initialize: copy the fitted heads into them,
    # or the first step would write the old (zero) heads back.
    refresh = getattr(run.engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
    run.engine.train()
    fit["seconds"] = time.perf_counter() - t0
    if run.writer is not None:
        for name, value in fit.items():
            run.writer.add_scalar(f"warm_start/{name}", value, 0)
        run.writer.flush()
    _say(
        f"warm start: char heads fitted on {fit['positions']:.0f} positions in {fit['seconds']:.1f} s: "
        f"char accuracy {fit['char_acc']:.3f}, cross-entropy {fit['char_ce']:.3f} per head "
        f"(zero heads: {fit['char_ce_zero']:.3f})",
    )


@torch.no_grad()
def _evaluate(run: Run, state: TrainState) -> dict[str, float]:
    """Collective: mean loss and metrics over `eval.batches` held-out micro-batches per rank."""
    run.engine.eval()
    loader = run.eval_loader
    loader.start_epoch(0)
    sums: dict[str, float] = {}
    weight = 0.0
    sample_batch = None
    for i, batch in enumerate(loader.iter_epoch()):
        if i >= run.cfg.eval.batches:
            break
        batch = _to_device(batch, run.device)
        out = _forward(run, batch, with_metrics=True)
        terms = _terms(out)
        w = float(batch["loss_mask"].sum())
        weight += w
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value) * w
        if sample_batch is None and run.rank == 0:
            if out.teacher_topk_ids is not None:  # online: the teacher's top-k come from the model
                batch = {**batch, "topk_ids": out.teacher_topk_ids}
            sample_batch = (batch, out.char_logits.detach())
    run.engine.train()
    sums["_weight"] = weight
    import torch.distributed as dist

    names = sorted(sums)
    t = torch.tensor([sums[n] for n in names], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    total = dict(zip(names, t.tolist()))
    w = max(total.pop("_weight"), 1.0)
    result = {f"eval/{k}": v / w for k, v in total.items()}
    if run.writer is not None:
        for name, value in result.items():
            run.writer.add_scalar(name, value, state.step)
        if sample_batch is not None and run.cfg.eval.text_samples:
            batch, logits = sample_batch
            text = monitor.text_samples(
                batch,
                logits,
                lookup=run.lookup,
                tokenizer=run.tokenizer,
                charset=run.table.charset,
                count=run.cfg.eval.text_samples,
            )
            run.writer.add_text("eval/samples", text, state.step)
        run.writer.flush()
    _say(f"eval at step {state.step}: loss {result.get('eval/loss', float('nan')):.4f}")
    return result
