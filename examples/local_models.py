"""Offline corpus, tokenizers and small causal LMs built locally (no hub): used by tests and the demo.

The corpus is the reStructuredText sources of the Python documentation shipped by Debian's
`python3.11-doc` package. Tokenizers are trained with HF `tokenizers`; models are built from a config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from spellm_ds.errors import SpellmError

PYTHON_DOCS_DIRS = (
    "/usr/share/doc/python3.11/html/_sources",
    "/usr/share/doc/python3-doc/html/_sources",
)

BYTE_LEVEL_SPECIALS = ("<|endoftext|>", "<|pad|>")
METASPACE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def python_docs_files(limit: int | None = None, root: str | None = None) -> list[Path]:
    """Return the Python docs corpus files in a stable order (the first `limit` when given)."""
    candidates = [root] if root else [os.environ.get("SPELLM_DOCS_CORPUS", ""), *PYTHON_DOCS_DIRS]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            files = sorted(Path(cand).rglob("*.rst.txt")) or sorted(Path(cand).rglob("*.txt"))
            if files:
                return files[:limit] if limit else files
    raise SpellmError(
        "Python docs corpus not found (install Debian package python3.11-doc, or set SPELLM_DOCS_CORPUS)"
    )


def train_tokenizer(
    files: list[Path] | list[str], out_dir: str | os.PathLike, vocab_size: int, kind: str = "byte_level"
) -> Path:
    """Train a BPE tokenizer on text files and save it as a HF fast tokenizer directory.

    `kind` is `byte_level` (GPT-2/Llama-3 style, `Ġ` marks a leading space) or `metaspace`
    (SentencePiece style, `▁` marks a space, `<0xNN>` byte-fallback tokens).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(f) for f in files]
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(BYTE_LEVEL_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train(paths, trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
        )
    elif kind == "metaspace":
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(METASPACE_SPECIALS), show_progress=False
        )
        tok.train(paths, trainer)
        # Byte-fallback tokens are ordinary vocabulary entries (as in Llama-2's SentencePiece model).
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for bt in byte_tokens:
            if bt not in vocab:
                vocab[bt] = len(vocab)
        tok = Tokenizer.from_str(json.dumps(spec))
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    else:
        raise SpellmError(f"tokenizer kind {kind!r} is not one of byte_level, metaspace")
    fast.save_pretrained(str(out))
    return out


def make_causal_lm(
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    arch: str = "llama",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 6,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Build a randomly initialised causal LM of architecture `arch` for a tokenizer and save both."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model_type = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}.get(arch)
    if model_type is None:
        raise SpellmError(f"arch {arch!r} is not one of llama, qwen2, mistral")
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out
