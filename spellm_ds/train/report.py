"""What the loop reports: progress lines, the start header, each step's scalars, and periodic eval.

The loop decides when; `spellm_ds.train.monitor` owns the TensorBoard writer, the means over ranks and
the text samples. `log_start` writes the run's header (parameter counts, batch identity, hpZ groups, the
resolved config as text and hparams), `log_train` one optimizer step's scalars (`StepStats`: sums over
its accepted micro-batches, averaged over ranks), and `evaluate` the mean loss and metrics over
`eval.batches` held-out micro-batches per rank, weighted by loss positions, with decoded text samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from spellm_ds.log import ALL_RANKS, get_logger
from spellm_ds.train import monitor
from spellm_ds.train.setup import Run, TrainState

if TYPE_CHECKING:
    from spellm_ds.model.student import SpeLLMOutput

_LOG = get_logger("train")


def say(text: str, always: bool = False) -> None:
    """Log a progress line (rank 0 only unless `always`)."""
    _LOG.info(text, extra=ALL_RANKS if always else None)


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


def terms(out: SpeLLMOutput) -> dict[str, torch.Tensor]:
    """The reported terms of one forward: the loss and every metric the model computed."""
    found = {"loss": out.loss.detach()}
    found.update(out.metrics or {})
    return found


def open_writer(run: Run, state: TrainState) -> None:
    """Open rank 0's TensorBoard writer (once), purging events a crashed run logged after `state.step`."""
    if run.rank == 0 and run.writer is None:
        run.writer = monitor.open_writer(run.cfg.tensorboard_dir, state.step)


def log_start(run: Run, state: TrainState, resume: Path | None) -> None:
    """Log where the run starts and write the TensorBoard header (config text, hparams)."""
    open_writer(run, state)
    trainable = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        for p in run.engine.module.parameters()
        if p.requires_grad
    )
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in run.engine.module.parameters())
    where = f"resumed from {resume}" + (" (universal)" if run.universal else "") if resume else "fresh start"
    say(
        f"{where} at step {state.step}; world size {run.world_size}, micro {run.pre.micro} x accum "
        f"{run.pre.grad_accum} = batch {run.pre.train_batch}; trainable {trainable:,} of {total:,} params",
    )
    if run.hpz_groups:
        where = "; ".join(f"{ranks} on {hosts[0]}" for ranks, hosts in run.hpz_groups)
        say(f"hpZ secondary partitions of {len(run.hpz_groups[0][0])} ranks: {where}")
    if run.writer is None:
        return
    flat = monitor.flatten(run.cfg.to_dict())
    flat.update(world_size=run.world_size, train_batch=run.pre.train_batch, grad_accum=run.pre.grad_accum)
    flat["trainable_params"] = trainable
    monitor.write_header(run.writer, run.cfg.to_yaml(), flat, state.step)


def log_train(run: Run, state: TrainState, stats: StepStats) -> None:
    """Collective: average one step's figures over ranks; rank 0 writes them to TensorBoard."""
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
        say(f"step {state.step}: loss {scalars.get('train/loss', float('nan')):.4f} lr {stats.lr:.3g}")


@torch.no_grad()
def evaluate(run: Run, state: TrainState) -> dict[str, float]:
    """Collective: mean loss and metrics over `eval.batches` held-out micro-batches per rank."""
    run.engine.eval()
    loader = run.eval_loader
    assert loader is not None  # eval.interval > 0 needs data.eval (checked with the config)
    loader.start_epoch(0)
    sums: dict[str, float] = {}
    weight = 0.0
    sample_batch = None
    for i, batch in enumerate(loader.iter_epoch()):
        if i >= run.cfg.eval.batches:
            break
        batch = run.to_device(batch)
        out = run.forward(batch, with_metrics=True)
        w = float(batch["loss_mask"].sum())
        weight += w
        for name, value in terms(out).items():
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
    say(f"eval at step {state.step}: loss {result.get('eval/loss', float('nan')):.4f}")
    return result
