"""Content hashes that tie shards, charsets, checkpoints and exports to one tokenizer and teacher."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def tokenizer_hash(tokenizer: Any) -> str:
    """Return a sha256 over what decides token ids: the tokenizer model (vocab, merges) and added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from spellm_ds.errors import SpellmError

        raise SpellmError(
            f"{type(tokenizer).__name__} is a slow tokenizer; a fast (Rust) tokenizer is required"
        )
    spec = json.loads(backend.to_str())
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or [])
    canon = json.dumps({"model": spec.get("model"), "added": added}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def config_hash(config: Any) -> str:
    """Return a sha256 of a HF model config's architecture fields (names, shapes, vocabulary)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    volatile = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "_commit_hash"}
    canon = json.dumps({k: v for k, v in d.items() if k not in volatile}, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def weights_hash(model_dir: str | os.PathLike) -> str:
    """Return a sha256 over the weight files of a checkpoint directory (names, sizes and file heads)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    files = sorted(
        p for p in root.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"} and p.is_file()
    )
    for p in files:
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as fh:
            # Head and tail: cheap for 140 GB checkpoints, and any re-save changes the header or tail.
            h.update(fh.read(1 << 20))
            size = p.stat().st_size
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()
