"""Setup of one training run: what the loop holds (`Run`), how it is built, resumed and warm-started.

`setup` joins the process group, checks that every rank can write the checkpoint directory, seeds the
RNGs, takes the tokenizer, HF config and charset file's table from preflight (nothing is read twice),
builds the char table, the student under ZeRO-3 and its DeepSpeed engine, the token lookup and the
training and eval loaders. `resume_target_of` picks the checkpoint a run continues (and refuses one of
the other teacher mode), `restore` loads it into the engine and the loader, and `warm_start_run` fits
the char heads before step 0. `Run.forward` is the engine call of one micro-batch, shared by the
training step and eval.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spellm_ds import dist as dist_env
from spellm_ds.config.deepspeed import fill_ds_config
from spellm_ds.config.preflight import Preflight
from spellm_ds.config.run import TrainConfig
from spellm_ds.errors import SpellmError
from spellm_ds.log import get_logger
from spellm_ds.train import checkpoint as ckpt
from spellm_ds.train.callbacks import Callback

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine
    from torch.utils.tensorboard import SummaryWriter
    from transformers import PreTrainedTokenizerBase

    from spellm_ds.charset.lookup import TokenLookup
    from spellm_ds.charset.table import CharTable
    from spellm_ds.data.loader import ShardLoader
    from spellm_ds.dist import RankInfo
    from spellm_ds.model.student import SpeLLMModel, SpeLLMOutput

_LOG = get_logger("train")


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
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    pre: Preflight
    rank: int
    world_size: int
    device: torch.device
    engine: DeepSpeedEngine
    table: CharTable
    lookup: TokenLookup
    tokenizer: PreTrainedTokenizerBase
    loader: ShardLoader
    callbacks: Callback = field(default_factory=Callback)
    batches: Iterator[dict[str, torch.Tensor]] | None = None  # the training batch iterator
    eval_loader: ShardLoader | None = None
    writer: SummaryWriter | None = None
    universal: bool = False
    # ZeRO++ hpZ: [(ranks, hosts)] of every secondary-partition group DeepSpeed built (empty when off)
    hpz_groups: list[tuple[list[int], list[str]]] = field(default_factory=list)
    saved_step: int = -1  # step of the newest checkpoint this process wrote or resumed from
    corrupt_at_start: int = 0  # corrupt samples counted before this process started (all ranks)
    # (name, lr multiple) of each optimizer group, in order. Kept here, not in the groups: a universal
    # checkpoint load copies group 0's hyperparameters into every group.
    lr_groups: list[tuple[str, float]] = field(default_factory=list)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's tensors on this rank's device."""
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, batch: dict[str, torch.Tensor], with_metrics: bool) -> SpeLLMOutput:
        """Engine forward with the teacher tensors: the model computes loss and metrics inside (ZeRO-3 safe).

        Online, the model computes the teacher's top-k itself (the shards' are ignored, if they hold any)
        and, for a training micro-batch, hands them to the callbacks.
        """
        if self.cfg.teacher == "online":
            out = self.engine(
                input_ids=batch["input_ids"],
                loss_mask=batch["loss_mask"],
                with_metrics=with_metrics,
                online_teacher=True,
            )
            if self.engine.module.training:  # training micro-batches only
                self.callbacks.on_teacher_topk(
                    batch["sample_index"], out.teacher_topk_ids, out.teacher_topk_logprobs
                )
            return out
        return self.engine(
            input_ids=batch["input_ids"],
            topk_ids=batch["topk_ids"],
            topk_logprobs=batch["topk_logprobs"],
            loss_mask=batch["loss_mask"],
            with_metrics=with_metrics,
        )


# ---------------------------------------------------------------------------------------------------
# Resume checks


def resume_target_of(cfg: TrainConfig) -> Path | None:
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
# Setup


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def setup(cfg: TrainConfig, pre: Preflight, info: RankInfo, resume: Path | None, callbacks: Callback) -> Run:
    """Collective: join the process group and build the engine, table, lookup and loaders of one run."""
    import deepspeed

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
    if pre.table is not None:  # model.charset, loaded and checked by preflight
        table = pre.table
    else:
        table = CharTable.build(pre.tokenizer, k=cfg.model.k, vocab_size=int(pre.hf_config.vocab_size))
    universal = resume is not None and int(ckpt.read_meta(resume)["world_size"]) != info.world_size
    ds_config = fill_ds_config(pre.ds_config, cfg, pre)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    model = _build_model(cfg, table, ds_config)
    groups = model.param_groups(cfg.optim.mlp_lr_scale)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    hpz_groups = dist_env.hpz_layout()
    return Run(
        cfg=cfg,
        pre=pre,
        rank=info.rank,
        world_size=info.world_size,
        device=device,
        engine=engine,
        table=table,
        lookup=TokenLookup(table, device),
        tokenizer=pre.tokenizer,
        loader=make_loader(cfg, pre, info.rank, info.world_size, cfg.data.train, train=True),
        eval_loader=(
            make_loader(cfg, pre, info.rank, info.world_size, cfg.data.eval, train=False)
            if cfg.data.eval
            else None
        ),
        callbacks=callbacks,
        universal=universal,
        lr_groups=[(g["name"], g["lr_scale"]) for g in groups],
        hpz_groups=hpz_groups,
    )


def _build_model(cfg: TrainConfig, table: CharTable, ds_config: dict[str, Any]) -> SpeLLMModel:
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


def make_loader(
    cfg: TrainConfig, pre: Preflight, rank: int, world_size: int, location: str, train: bool
) -> ShardLoader:
    """This rank's loader of the shards at `location`: shuffled and resumable for training, else in order."""
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


# ---------------------------------------------------------------------------------------------------
# Resume and warm start


def restore(run: Run, resume: Path | None) -> TrainState:
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


def warm_start_run(run: Run) -> None:
    """Collective: fit the char heads on the first training positions before step 0 (see warm_start)."""
    from spellm_ds.train.warm_start import warm_start_heads

    cfg = run.cfg
    per_batch = run.pre.micro * cfg.data.seq_len * run.world_size
    n_batches = max(1, -(-cfg.warm_start.positions // per_batch))
    loader = make_loader(cfg, run.pre, run.rank, run.world_size, cfg.data.train, train=False)
    loader.start_epoch(0)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for i, batch in enumerate(loader.iter_epoch()):
            if i >= n_batches:
                return
            yield run.to_device(batch)

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
    _LOG.info(
        f"warm start: char heads fitted on {fit['positions']:.0f} positions in {fit['seconds']:.1f} s: "
        f"char accuracy {fit['char_acc']:.3f}, cross-entropy {fit['char_ce']:.3f} per head "
        f"(zero heads: {fit['char_ce_zero']:.3f})",
    )
