"""Run configuration: the sections of a run config, strict YAML loading and `key=value` overrides.

A run config is one YAML file whose sections map to the dataclasses below (see `configs/*.yaml`).
Loading is strict: an unknown key, a wrong type or an out-of-range value is a problem, and every
problem found is reported in one `SpellmError`. Overrides use dotted keys (`optim.lr=3e-4`,
`checkpoint.resume=never`) and are converted to the field's type.

Two stages of checks:

* `load_config()` / the dataclasses' `__post_init__`: the file alone (keys, types, ranges, choices).
* `spellm_ds.config.preflight.preflight(config, world_size)`: everything that needs the file system or
  the launch, run by the trainer before any process-group work (files, tokenizer, charset, shards,
  the DeepSpeed JSON, the batch identity).

Beside it: `spellm_ds.config.recipe` (the measured defaults every shipped recipe follows) and
`spellm_ds.config.deepspeed` (the run config's values filled into the DeepSpeed JSON).

Callbacks (`callbacks:`, a list of `module:factory` import paths, empty by default): code outside the
library that the trainer calls at fixed points of the loop (`spellm_ds.train.callbacks.Callback`: a
micro-batch's sample indices drawn, its loss computed (the callback may replace it), the online
teacher's top-k of a training micro-batch known, an optimizer step done). Each factory is imported and
called once per rank at start with that rank and returns a `Callback`; the module must be importable by
every rank (on its `PYTHONPATH`). The tests register their fault injection and sample tracing this
way (`tests/fault_injection.py`); a normal run lists none.

Relative paths resolve against the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from spellm_ds.config.schema import ConfigError, Section, build, positive, set_dotted
from spellm_ds.errors import SpellmError

Selection = Literal["lowest", "teacher_prior"]
Regularizer = Literal["kl6", "ce_top1", "kl_full", "none"]
TeacherMode = Literal["offline", "online"]
# The training dtypes: two of the names of `spellm_ds.dtypes`.
TrainDType = Literal["float32", "bfloat16"]


@dataclass(kw_only=True)
class ModelConfig(Section):
    """The student: a local HF causal LM plus k char heads."""

    path: str
    """Directory of a local HF causal LM (config, safetensors weights, fast tokenizer)."""
    trainable_layers: int = 5
    """N: the MLPs of the last N decoder layers train (with the char heads); 0 trains the heads only."""
    k: int = 10
    """Number of char heads (characters predicted per token)."""
    charset: str | None = None
    """CharTable file (`CharTable.save`); None builds it from the model's tokenizer at start."""
    dtype: TrainDType = "float32"
    """Training dtype of the weights: float32 (exact CPU tests) or bfloat16 (GPU runs)."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "model.trainable_layers", self.trainable_layers, allow_zero=True)
        positive(p, "model.k", self.k)
        return p


@dataclass(kw_only=True)
class DataConfig(Section):
    """Teacher shards (see `spellm_ds.data.shards`) streamed by `spellm_ds.data.loader`."""

    train: str
    """Training shard location: a directory or URL prefix holding `index.json`."""
    eval: str | None = None
    """Held-out shard location for periodic eval; None disables eval."""
    seq_len: int
    """Tokens per sample; must equal the shards' `seq_len`."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process)."""
    skip_corrupt: bool = False
    """Skip and count corrupt samples instead of stopping with an error naming shard and key."""
    read_retries: int = 5
    """Remote shards (``pipe:``, http(s)): failed reads in a row retried, with a doubling backoff, before
    the run stops with an error naming the shard."""
    read_timeout_s: float = 60.0
    """Remote shards: a read that receives no byte for this long counts as a failed attempt."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "data.seq_len", self.seq_len)
        positive(p, "data.num_workers", self.num_workers, allow_zero=True)
        positive(p, "data.read_retries", self.read_retries, allow_zero=True)
        positive(p, "data.read_timeout_s", self.read_timeout_s)
        return p


@dataclass(kw_only=True)
class BatchConfig(Section):
    """Batch sizes; the identity `train = micro x grad_accum x world_size` is checked at start."""

    micro: int = 1
    """Sequences per rank per forward/backward (DeepSpeed `train_micro_batch_size_per_gpu`)."""
    grad_accum: int | None = None
    """Micro-batches per optimizer step; None derives it from `train` and the world size."""
    train: int | None = None
    """Global sequences per optimizer step; None derives it as micro x grad_accum x world size."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "batch.micro", self.micro)
        positive(p, "batch.grad_accum", self.grad_accum)
        positive(p, "batch.train", self.train)
        if (
            self.train is not None
            and self.grad_accum is not None
            and self.train % (self.micro * self.grad_accum)
        ):
            p.append(
                f"batch.train={self.train} is not a multiple of batch.micro x batch.grad_accum "
                f"= {self.micro * self.grad_accum}"
            )
        if self.train is not None and self.grad_accum is None and self.train % self.micro:
            p.append(f"batch.train={self.train} is not a multiple of batch.micro={self.micro}")
        return p

    def resolve(self, world_size: int) -> tuple[int, int, int]:
        """Return (micro, grad_accum, train) for `world_size` ranks, or raise naming the broken identity."""
        micro = self.micro
        if self.grad_accum is None and self.train is None:
            accum = 1
            train = micro * world_size
        elif self.grad_accum is None:
            assert self.train is not None
            accum, rest = divmod(self.train, micro * world_size)
            if rest or accum < 1:
                raise SpellmError(
                    f"batch.train={self.train} is not a positive multiple of batch.micro x world size "
                    f"= {micro} x {world_size} = {micro * world_size}; change batch.train or batch.micro"
                )
            train = self.train
        else:
            accum = self.grad_accum
            train = micro * accum * world_size
            if self.train is not None and self.train != train:
                raise SpellmError(
                    f"batch identity train = micro x grad_accum x world size does not hold: "
                    f"{self.train} != {micro} x {accum} x {world_size} = {train}; set batch.train={train}, "
                    f"or batch.grad_accum=null to derive it"
                )
        return micro, accum, train


@dataclass(kw_only=True)
class OptimConfig(Section):
    """AdamW over the trainable parameters only."""

    lr: float = 4e-3
    """Peak learning rate (after warmup) of the char heads (the measured recipe, `RECIPE_POLICY`)."""
    mlp_lr_scale: float = 1.0
    """Learning rate of the trainable MLPs as a multiple of the heads' (the same schedule): pretrained
    MLPs want a far smaller step than zero-initialised heads."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "optim.lr", self.lr)
        positive(p, "optim.mlp_lr_scale", self.mlp_lr_scale, allow_zero=True)
        positive(p, "optim.weight_decay", self.weight_decay, allow_zero=True)
        positive(p, "optim.eps", self.eps)
        positive(p, "optim.grad_clip", self.grad_clip, allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            p.append(f"optim.betas must be two values in [0, 1), got {self.betas}")
        return p


@dataclass(kw_only=True)
class ScheduleConfig(Section):
    """Linear warmup from 0 to `optim.lr`, then cosine decay to `min_lr` at `max_steps`."""

    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    min_lr: float = 0.0
    """Learning rate reached at the last step."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "schedule.warmup_steps", self.warmup_steps, allow_zero=True)
        positive(p, "schedule.min_lr", self.min_lr, allow_zero=True)
        return p


@dataclass(kw_only=True)
class LossConfig(Section):
    """Char loss with top-5 selection plus a token-level regulariser on the frozen lm_head."""

    selection: Selection = "teacher_prior"
    """lowest: train on the candidate with the lowest char loss (the paper); teacher_prior: char loss
    minus tau x teacher log-prob, which favours the teacher's own top choice."""
    tau: float = 10.0
    """Weight of the teacher log-prob in the teacher_prior rule."""
    regularizer: Regularizer = "kl6"
    """kl6: KL over the 5 candidates + an 'everything else' bucket (full-vocab softmax); ce_top1: CE to
    teacher top-1; kl_full: KL over the teacher's whole vocabulary distribution (needs teacher: online);
    none."""
    reg_weight: float = 5.0
    """Weight of the regulariser in the total loss."""
    reg_chunk: int = 1024
    """Tokens per chunk of the regulariser (bounds the [chunk, V] logits held at once)."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "loss.tau", self.tau, allow_zero=True)
        positive(p, "loss.reg_weight", self.reg_weight, allow_zero=True)
        positive(p, "loss.reg_chunk", self.reg_chunk)
        return p


@dataclass(kw_only=True)
class WarmStartConfig(Section):
    """A fit of the char heads before step 0, on the untouched model's final hidden states."""

    positions: int = 32768
    """Training-shard positions to fit on (taken from the first shards, split over ranks); 0: no fit,
    the heads start at zero."""
    iters: int = 60
    """L-BFGS iterations per head (each head is an independent softmax over the symbols)."""
    l2: float = 1e-4
    """L2 penalty on the head weights (keeps near-separable symbols from diverging)."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "warm_start.positions", self.positions, allow_zero=True)
        positive(p, "warm_start.iters", self.iters)
        positive(p, "warm_start.l2", self.l2, allow_zero=True)
        return p


@dataclass(kw_only=True)
class EvalConfig(Section):
    """Periodic evaluation on `data.eval`."""

    interval: int = 0
    """Evaluate every this many optimizer steps (and at the end); 0 disables eval."""
    batches: int = 4
    """Micro-batches per rank per evaluation."""
    text_samples: int = 2
    """Decoded student-vs-teacher text samples written to TensorBoard per evaluation."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "eval.interval", self.interval, allow_zero=True)
        positive(p, "eval.batches", self.batches)
        positive(p, "eval.text_samples", self.text_samples, allow_zero=True)
        return p


@dataclass(kw_only=True)
class CheckpointConfig(Section):
    """Resumable training state (DeepSpeed engine state + client state)."""

    dir: str | None = None
    """Checkpoint directory; None means `<run_dir>/checkpoints`."""
    interval: int = 100
    """Save every this many optimizer steps (and at the end, and on a preemption signal)."""
    keep_latest_k: int = 3
    """Keep this many newest complete checkpoints; older ones are deleted. 0 keeps all."""
    save_at_start: bool = False
    """Also save step 0, after the warm start: the starting point an export of the trained run can be
    compared with (keep it with `keep_latest_k: 0`)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in `dir`, else start fresh; never: start fresh;
    any other value: the path of one checkpoint tag directory to resume from."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "checkpoint.interval", self.interval)
        positive(p, "checkpoint.keep_latest_k", self.keep_latest_k, allow_zero=True)
        if not self.resume:
            p.append("checkpoint.resume must be auto, never or a checkpoint path")
        return p


@dataclass(kw_only=True)
class TrainConfig(Section):
    """One distillation run."""

    run_dir: str
    """Output root: checkpoints and TensorBoard logs default to folders inside it."""
    deepspeed: str
    """DeepSpeed JSON (see ds_configs/README.md); the trainer fills the batch, optimizer and dtype keys."""
    tensorboard: str | None = None
    """TensorBoard log directory; None means `<run_dir>/tensorboard`."""
    max_steps: int
    """Optimizer steps to train (the cosine schedule ends here)."""
    seed: int = 0
    """Seed for torch RNGs and the data order."""
    max_consecutive_nonfinite: int = 5
    """Stop (exit code 3) after this many micro-batches in a row with a non-finite loss."""
    log_interval: int = 1
    """Write training scalars every this many optimizer steps."""
    teacher: TeacherMode = "offline"
    """offline: the teacher's top-5 come from the shards (built by `spellm-ds build-shards`); online: the
    model computes them in every forward from the shared frozen layers (the original MLPs of the trained
    layers run a second time), so token-only shards (`build-shards --no-teacher`) suffice."""
    model: ModelConfig
    data: DataConfig
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    callbacks: list[str] = field(default_factory=list)
    """`module:factory` import paths of training callbacks (see the module docstring); empty in normal
    runs. Each factory is called once per rank at start with the rank and returns a
    `spellm_ds.train.callbacks.Callback`."""

    def problems(self) -> list[str]:
        p: list[str] = []
        positive(p, "max_steps", self.max_steps)
        for i, path in enumerate(self.callbacks):
            module, sep, factory = path.partition(":")
            if not (sep and module.strip() and factory.strip()):
                p.append(f"callbacks[{i}]={path!r} is not a module:factory import path")
        positive(p, "max_consecutive_nonfinite", self.max_consecutive_nonfinite)
        positive(p, "log_interval", self.log_interval)
        if self.schedule.warmup_steps > self.max_steps:
            p.append(f"schedule.warmup_steps={self.schedule.warmup_steps} exceeds max_steps={self.max_steps}")
        if self.schedule.min_lr > self.optim.lr:
            p.append(f"schedule.min_lr={self.schedule.min_lr} exceeds optim.lr={self.optim.lr}")
        if self.loss.regularizer == "kl_full" and self.teacher != "online":
            p.append(
                f"loss.regularizer=kl_full needs the teacher's full distribution, which only teacher: online "
                f"computes; teacher is {self.teacher} (set teacher=online or another loss.regularizer)"
            )
        if self.eval.interval and not self.data.eval:
            p.append("eval.interval > 0 needs data.eval (held-out shards); set eval.interval=0 to disable")
        return p

    @property
    def checkpoint_dir(self) -> Path:
        """The checkpoint directory (explicit or under run_dir)."""
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    @property
    def tensorboard_dir(self) -> Path:
        """The TensorBoard log directory (explicit or under run_dir)."""
        return Path(self.tensorboard or Path(self.run_dir) / "tensorboard")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain nested dicts (what `config_from_dict` reads back)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Return the config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_from_dict(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>"
) -> TrainConfig:
    """Build a TrainConfig from nested dicts plus `key=value` overrides; raise once with every problem."""
    problems: list[str] = []
    data = json.loads(json.dumps(data)) if data else {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not key=value")
            continue
        set_dotted(TrainConfig, data, key.strip(), raw, problems)
    cfg, ok = build(TrainConfig, data, "", problems)
    if problems or not ok:
        raise ConfigError(f"config {source}", problems or ["could not build the config"])
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Load a run config strictly from YAML, apply `key=value` overrides, and validate it."""
    p = Path(path)
    if not p.is_file():
        raise SpellmError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpellmError(f"config {p}: not valid YAML ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise SpellmError(f"config {p}: the top level must be a mapping of sections")
    return config_from_dict(data or {}, overrides, source=str(p))
