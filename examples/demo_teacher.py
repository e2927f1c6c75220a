"""The demo teacher: a small Llama trained from scratch on the Python docs corpus, offline and cached.

`python -m examples.demo_teacher --out runs/demo/teacher [--steps N]` writes a plain HF directory
(`save_pretrained` weights + tokenizer) that every pipeline stage accepts like any other teacher, plus:

- `demo_teacher.json`: cache key, hyperparameters, held-out perplexity, tokens/s, train time;
- `split.json`: the document-level split (train / held-out file names relative to the corpus root);
- `corpus/train.jsonl`, `corpus/heldout.jsonl`: one `{"doc", "text"}` record per document, the inputs
  for building teacher shards. Held-out documents never reach the tokenizer, the teacher or the student.

Training is deterministic (seeded init, seeded batch order, a fixed step count rather than wall time) and
cached: the key hashes the corpus file list and sizes, the hyperparameters and `CODE_VERSION`; a rerun
with the same key returns at once. The output appears atomically (built in a temporary sibling directory,
then renamed), so an interrupted run leaves no half-written teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import read_json_or_none, write_json
from spellm_ds.log import get_logger, setup_logging

# Bump when a change here alters the teacher that a given configuration produces.
CODE_VERSION = "demo-teacher-1"
META_NAME = "demo_teacher.json"
SPLIT_NAME = "split.json"


@dataclass(kw_only=True)
class DemoTeacherConfig:
    """Corpus split, tokenizer, architecture and optimisation of the demo teacher."""

    vocab_size: int = 8192  # byte-level BPE vocabulary, trained on the training documents only
    hidden_size: int = 192  # 256 reached the same held-out ppl at this token budget, 1.6x slower
    num_layers: int = 6  # N=5 trainable MLPs (the paper's default) must fit below the top layer
    intermediate_size: int = 512
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention, as in Llama 3
    seq_len: int = 256  # training context; also the model's max_position_embeddings
    batch_size: int = 8  # sequences per step
    steps: int = 400  # fixed step count (not wall time), so the result does not depend on load
    lr: float = 2e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    heldout_fraction: float = 0.05  # share of documents held out (at least one)
    eval_every: int = 50  # steps between progress evaluations on a slice of the held-out set
    max_eval_tokens: int = 131072  # held-out tokens scored for the final perplexity
    seed: int = 0
    limit_docs: int | None = None  # use only the first N corpus documents (tests)

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "seq_len",
            "batch_size",
            "steps",
            "eval_every",
            "max_eval_tokens",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 300:
            problems.append(f"vocab_size must be >= 300 (256 bytes + merges), got {self.vocab_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            problems.append(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) and "
                f"num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        if not 0.0 < self.heldout_fraction < 0.5:
            problems.append(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            problems.append("warmup_steps and weight_decay must be >= 0, grad_clip > 0")
        if self.limit_docs is not None and self.limit_docs < 2:
            problems.append(f"limit_docs must be >= 2 (one train, one held-out), got {self.limit_docs}")
        if problems:
            raise SpellmError("demo teacher config: " + "; ".join(problems))


@dataclass(kw_only=True)
class DemoTeacherResult:
    """Where the teacher is and what its training measured (also stored in `demo_teacher.json`)."""

    path: Path
    cached: bool
    cache_key: str
    heldout_ppl: float
    train_tokens: int
    heldout_tokens: int
    tokens_per_s: float
    train_seconds: float
    num_params: int


def split_documents(files: list[Path], root: Path, heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Split documents by a hash of their name: the ceil(f·n) smallest hashes are held out."""
    names = sorted(str(Path(f).relative_to(root)) for f in files)
    n_held = max(1, math.ceil(heldout_fraction * len(names)))
    by_hash = sorted(names, key=lambda n: hashlib.sha256(n.encode("utf-8")).hexdigest())
    held = set(by_hash[:n_held])
    return [n for n in names if n not in held], [n for n in names if n in held]


def cache_key(files: list[Path], root: Path, cfg: DemoTeacherConfig) -> str:
    """Return the hash of what decides the teacher: corpus file names + sizes, config, code version."""
    corpus = [(str(Path(f).relative_to(root)), Path(f).stat().st_size) for f in sorted(files)]
    blob = json.dumps(
        {"corpus": corpus, "config": dataclasses.asdict(cfg), "code": CODE_VERSION}, sort_keys=True
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def cache_key_for_args(argv: list[str]) -> str:
    """Return the cache key the CLI would use for these extra flags (`--out` aside)."""
    from examples.local_models import python_docs_files

    args = _parse_args(["--out", "-", *argv])
    cfg = _config_from_args(args)
    files = python_docs_files(limit=cfg.limit_docs, root=args.corpus_root)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return cache_key(files, root, cfg)


def read_cached(out: str | os.PathLike, key: str | None = None) -> DemoTeacherResult | None:
    """Return the stored result of a complete teacher directory (matching `key` when given), else None."""
    meta = read_json_or_none(Path(out) / META_NAME)
    if meta is None:
        return None
    if key is not None and meta.get("cache_key") != key:
        return None
    if not any(Path(out).glob("*.safetensors")):
        return None
    fields = {f.name for f in dataclasses.fields(DemoTeacherResult)} - {"path", "cached"}
    return DemoTeacherResult(path=Path(out), cached=True, **{k: meta[k] for k in fields})


def pack_rows(token_lists: list[list[int]], eos_id: int, seq_len: int) -> Any:
    """Concatenate documents with EOS after each and cut into [n, seq_len] rows (the tail is dropped)."""
    import torch

    flat = [t for ids in token_lists for t in (*ids, eos_id)]
    n = len(flat) // seq_len
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _lr_at(step: int, cfg: DemoTeacherConfig) -> float:
    """Linear warmup then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def heldout_perplexity(model, rows, batch_size: int) -> float:
    """Return exp(mean next-token NLL) of a causal LM over packed [n, L] rows."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, rows.shape[0], batch_size):
            x = rows[i : i + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / max(1, count))


def write_corpus(out: Path, root: Path, train: list[str], held: list[str]) -> dict[str, list[str]]:
    """Write the split lists and one JSONL per split; return the documents' texts per split."""
    texts: dict[str, list[str]] = {}
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    for split, names in (("train", train), ("heldout", held)):
        docs = [(root / n).read_text(encoding="utf-8", errors="replace") for n in names]
        texts[split] = docs
        with open(out / "corpus" / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for name, text in zip(names, docs):
                fh.write(json.dumps({"doc": name, "text": text}, ensure_ascii=False) + "\n")
    split_doc = {"corpus_root": str(root), "train": train, "heldout": held}
    write_json(out / SPLIT_NAME, split_doc, indent=1, sort_keys=False)
    return texts


def build_demo_teacher(
    out: str | os.PathLike,
    cfg: DemoTeacherConfig | None = None,
    corpus_root: str | os.PathLike | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> DemoTeacherResult:
    """Train (or reuse from cache) the demo teacher into `out` as a HF directory; return its figures."""
    from examples.local_models import python_docs_files

    cfg = cfg or DemoTeacherConfig()
    log = log or _say
    files = python_docs_files(limit=cfg.limit_docs, root=str(corpus_root) if corpus_root else None)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    key = cache_key(files, root, cfg)
    out = Path(out)
    if not force:
        hit = read_cached(out, key)
        if hit is not None:
            log(f"[teacher] cached: {out} (key {key}, held-out ppl {hit.heldout_ppl:.1f})")
            return hit
    if out.exists() and not (out / META_NAME).is_file() and any(out.iterdir()):
        raise SpellmError(f"{out} exists, is not empty and holds no {META_NAME}: refusing to overwrite it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = _train(tmp, files, root, cfg, key, log)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.path = out
    return result


def _train(
    out: Path, files: list[Path], root: Path, cfg: DemoTeacherConfig, key: str, log: Callable[[str], None]
) -> DemoTeacherResult:
    """Split, tokenise, train and save into `out`; return the measured figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from examples.local_models import make_causal_lm, train_tokenizer

    hf_logging.disable_progress_bar()

    train_names, held_names = split_documents(files, root, cfg.heldout_fraction)
    log(f"[teacher] corpus {root}: {len(train_names)} train / {len(held_names)} held-out documents")
    texts = write_corpus(out, root, train_names, held_names)

    t0 = time.perf_counter()
    train_tokenizer([root / n for n in train_names], out, cfg.vocab_size, kind="byte_level")
    tok = AutoTokenizer.from_pretrained(str(out))
    log(f"[teacher] byte-level BPE tokenizer, vocab {len(tok)}, trained in {time.perf_counter() - t0:.1f} s")
    enc = {s: tok(docs, add_special_tokens=False)["input_ids"] for s, docs in texts.items()}
    train_rows = pack_rows(enc["train"], tok.eos_token_id, cfg.seq_len)
    held_rows = pack_rows(enc["heldout"], tok.eos_token_id, cfg.seq_len)
    held_rows = held_rows[: max(1, cfg.max_eval_tokens // cfg.seq_len)]
    if train_rows.shape[0] < cfg.batch_size or held_rows.shape[0] == 0:
        raise SpellmError(
            f"corpus too small for seq_len {cfg.seq_len}: {train_rows.shape[0]} train rows, "
            f"{held_rows.shape[0]} held-out rows"
        )
    log(
        f"[teacher] tokens: train {train_rows.numel():,} ({train_rows.shape[0]} rows of {cfg.seq_len}), "
        f"held-out scored {held_rows.numel():,}"
    )

    make_causal_lm(
        out,
        out,
        arch="llama",
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        max_positions=cfg.seq_len,
        seed=cfg.seed,
    )
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(train_rows.shape[0], generator=gen)
    cursor, epoch = 0, 0
    probe = held_rows[: max(1, min(held_rows.shape[0], 16384 // cfg.seq_len))]
    log(
        f"[teacher] Llama {num_params / 1e6:.2f}M params, {cfg.steps} steps × {cfg.batch_size} × "
        f"{cfg.seq_len} tokens"
    )
    t_start = time.perf_counter()
    train_time, loss_ema = 0.0, None
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > order.numel():
            order, cursor, epoch = torch.randperm(train_rows.shape[0], generator=gen), 0, epoch + 1
        x = train_rows[order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        ts = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        train_time += time.perf_counter() - ts
        loss_val = float(loss.detach())
        loss_ema = loss_val if loss_ema is None else 0.95 * loss_ema + 0.05 * loss_val
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            tps = (step + 1) * x.numel() / train_time
            ppl = heldout_perplexity(model, probe, cfg.batch_size)
            log(
                f"[teacher] step {step + 1}/{cfg.steps} epoch {epoch} loss {loss_ema:.3f} "
                f"held-out ppl (probe) {ppl:.1f} | {tps:,.0f} tok/s | {time.perf_counter() - t_start:.0f} s"
            )
    train_tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    tokens_per_s = train_tokens / train_time
    t_eval = time.perf_counter()
    ppl = heldout_perplexity(model, held_rows, cfg.batch_size)
    log(
        f"[teacher] held-out perplexity {ppl:.2f} over {held_rows.numel():,} tokens "
        f"({time.perf_counter() - t_eval:.0f} s)"
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    result = DemoTeacherResult(
        path=out,
        cached=False,
        cache_key=key,
        heldout_ppl=ppl,
        train_tokens=train_tokens,
        heldout_tokens=int(held_rows.numel()),
        tokens_per_s=tokens_per_s,
        train_seconds=train_time,
        num_params=num_params,
    )
    meta = {k: v for k, v in dataclasses.asdict(result).items() if k not in ("path", "cached")}
    meta.update(
        config=dataclasses.asdict(cfg),
        code_version=CODE_VERSION,
        train_docs=len(train_names),
        heldout_docs=len(held_names),
        epochs_seen=train_tokens / train_rows.numel(),
        torch_threads=torch.get_num_threads(),
    )
    # Written last: its presence marks a complete directory.
    write_json(out / META_NAME, meta, indent=1, sort_keys=False)
    return result


_say = get_logger("demo-teacher").info


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the CLI: every DemoTeacherConfig field is a `--flag`."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo_teacher", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", required=True, help="output HF directory (reused when the cache key matches)"
    )
    parser.add_argument("--corpus-root", default=None, help="corpus directory (default: the Python docs)")
    parser.add_argument("--force", action="store_true", help="retrain even when the cache matches")
    for f in dataclasses.fields(DemoTeacherConfig):
        kind = float if f.type in ("float", float) else int
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    return parser.parse_args(argv)


def _config_from_args(args: argparse.Namespace) -> DemoTeacherConfig:
    return DemoTeacherConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoTeacherConfig)})


def main(argv: list[str] | None = None) -> int:
    """Build or reuse the demo teacher and print its held-out perplexity; user errors exit 2."""
    args = _parse_args(argv)
    setup_logging()
    try:
        cfg = DemoTeacherConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoTeacherConfig)}
        )
        res = build_demo_teacher(args.out, cfg, corpus_root=args.corpus_root, force=args.force)
    except SpellmError as exc:
        print(f"demo_teacher: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"[teacher] {res.path}: held-out ppl {res.heldout_ppl:.2f}, {res.tokens_per_s:,.0f} tok/s, "
        f"trained {res.train_seconds:.0f} s on {res.train_tokens:,} tokens{' (cached)' if res.cached else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
