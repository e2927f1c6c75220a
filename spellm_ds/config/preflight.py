"""Preflight: every check and read outside the YAML, before any process group, handed to the trainer.

`preflight(config, world_size)` runs before the trainer creates a process group, so bad input stops
every rank with one error (exit code 2) listing every problem: files exist, N fits the model's layer
count, the charset, tokenizer and shards belong together (tokenizer hashes, sequence length, k, vocab
size, teacher top-k for `teacher: offline`), the DeepSpeed JSON has concrete values and ZeRO stage 3,
`train_batch = micro_batch x grad_accum x world_size` holds, and a named resume checkpoint exists.

What the checks read is kept in the returned `Preflight` (the tokenizer, the HF config, the charset
file's table, the shard indexes, the DeepSpeed JSON), and the trainer takes them from there instead of
reading them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spellm_ds.config.run import TrainConfig
from spellm_ds.config.schema import ConfigError
from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import read_json

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from spellm_ds.charset.table import CharTable


@dataclass(kw_only=True)
class Preflight:
    """What the checks learned and read, so the trainer does not read it twice."""

    micro: int
    grad_accum: int
    train_batch: int
    num_layers: int
    tokenizer: PreTrainedTokenizerBase
    """The model's tokenizer (`model.path`)."""
    hf_config: PretrainedConfig
    """The model's HF config (`model.path/config.json`)."""
    table: CharTable | None
    """The char table of `model.charset`, checked against the tokenizer and k; None when not set."""
    tokenizer_hash: str
    train_index: dict[str, Any]
    eval_index: dict[str, Any] | None
    ds_config: dict[str, Any]


def _find_auto(obj: Any, path: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _find_auto(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _find_auto(v, f"{path}[{i}]")
    elif obj == "auto":
        found.append(path)
    return found


def _is_remote(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def _check_shards(
    kind: str, location: str, cfg: TrainConfig, tok_hash: str | None, vocab: int | None, problems: list[str]
) -> dict[str, Any] | None:
    from spellm_ds.data.shards import read_index

    if not _is_remote(location) and not Path(location).is_dir():
        problems.append(f"data.{kind}: shard directory {location} does not exist")
        return None
    try:
        index = read_index(location)
    except SpellmError as exc:
        problems.append(f"data.{kind}: {exc}")
        return None
    if index["seq_len"] != cfg.data.seq_len:
        problems.append(
            f"data.{kind}: shards in {location} have seq_len {index['seq_len']}, config data.seq_len is "
            f"{cfg.data.seq_len}"
        )
    if tok_hash is not None and index["tokenizer_hash"] != tok_hash:
        problems.append(
            f"data.{kind}: shards in {location} were built with another tokenizer (index.json tokenizer_hash "
            f"{index['tokenizer_hash'][:12]}..., model {cfg.model.path} has {tok_hash[:12]}...)"
        )
    if vocab is not None and index["vocab_size"] > vocab:
        problems.append(
            f"data.{kind}: shards in {location} have vocab_size {index['vocab_size']} > the model's {vocab}"
        )
    if index["totals"]["samples"] < 1:
        problems.append(f"data.{kind}: shards in {location} hold no samples")
    if cfg.teacher == "offline" and not index["top_k"]:
        problems.append(
            f"data.{kind}: shards in {location} hold input ids only (built with --no-teacher, top_k 0); "
            "teacher: offline needs the teacher's top-k in the shards: set teacher=online or build "
            "teacher shards"
        )
    return index


def preflight(cfg: TrainConfig, world_size: int) -> Preflight:
    """Check everything outside the YAML before any process-group work; raise once with every problem."""
    problems: list[str] = []
    model_dir = Path(cfg.model.path)
    num_layers, vocab, tok_hash = 0, None, None
    hf_cfg = tok = table = None
    if not (model_dir / "config.json").is_file():
        problems.append(f"model.path: {model_dir} is not a HF model directory (no config.json)")
    else:
        from transformers import AutoConfig, AutoTokenizer

        from spellm_ds.fingerprint import tokenizer_hash

        try:
            hf_cfg = AutoConfig.from_pretrained(str(model_dir))
            num_layers = int(getattr(hf_cfg, "num_hidden_layers", 0))
            vocab = int(getattr(hf_cfg, "vocab_size", 0)) or None
        except (OSError, ValueError) as exc:
            problems.append(f"model.path: cannot read {model_dir}/config.json ({exc})")
        if num_layers and cfg.model.trainable_layers > num_layers:
            problems.append(
                f"model.trainable_layers={cfg.model.trainable_layers} is larger than the model's "
                f"{num_layers} decoder layers ({model_dir})"
            )
        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
            tok_hash = tokenizer_hash(tok)
        except (OSError, ValueError) as exc:
            problems.append(f"model.path: cannot load the tokenizer of {model_dir} ({exc})")
    if cfg.model.charset is not None:
        cs = Path(cfg.model.charset)
        if not cs.is_file():
            problems.append(f"model.charset: {cs} does not exist")
        else:
            from spellm_ds.charset import CharTable

            try:
                table = CharTable.load(cs)
            except (SpellmError, OSError) as exc:
                problems.append(f"model.charset: {exc}")
            else:
                if tok_hash is not None and table.tokenizer_hash != tok_hash:
                    problems.append(
                        f"model.charset: {cs} was built for another tokenizer than {model_dir}'s "
                        f"({table.tokenizer_hash[:12]}... != {tok_hash[:12]}...)"
                    )
                if table.k != cfg.model.k:
                    problems.append(f"model.charset: {cs} has k={table.k}, config model.k={cfg.model.k}")
    train_index = _check_shards("train", cfg.data.train, cfg, tok_hash, vocab, problems)
    eval_index = None
    if cfg.data.eval:
        eval_index = _check_shards("eval", cfg.data.eval, cfg, tok_hash, vocab, problems)
    ds_config: dict[str, Any] = {}
    ds_path = Path(cfg.deepspeed)
    if not ds_path.is_file():
        problems.append(f"deepspeed: {ds_path} does not exist")
    else:
        try:
            ds_config = read_json(ds_path, "DeepSpeed config")
        except SpellmError as exc:
            problems.append(f"deepspeed: {exc}")
        else:
            autos = _find_auto(ds_config)
            if autos:
                problems.append(
                    f'deepspeed: {ds_path} uses "auto" at {", ".join(autos)}; give concrete values'
                )
            if "scheduler" in ds_config:
                problems.append(
                    f"deepspeed: {ds_path} has a 'scheduler' section; the schedule comes from the run "
                    "config (schedule.warmup_steps, schedule.min_lr)"
                )
            stage = ds_config.get("zero_optimization", {}).get("stage")
            if stage != 3:
                problems.append(f"deepspeed: {ds_path} must use zero_optimization.stage 3, got {stage}")
    micro = accum = train_batch = 0
    try:
        micro, accum, train_batch = cfg.batch.resolve(world_size)
    except SpellmError as exc:
        problems.append(str(exc))
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        problems.append(f"checkpoint.resume: {resume} is not auto, never or an existing checkpoint directory")
    if problems:
        raise ConfigError("cannot start training", problems)
    assert train_index is not None and tok_hash is not None and tok is not None and hf_cfg is not None
    return Preflight(
        micro=micro,
        grad_accum=accum,
        train_batch=train_batch,
        num_layers=num_layers,
        tokenizer=tok,
        hf_config=hf_cfg,
        table=table,
        tokenizer_hash=tok_hash,
        train_index=train_index,
        eval_index=eval_index,
        ds_config=ds_config,
    )
