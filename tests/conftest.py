"""Shared fixtures: an offline corpus, locally trained tokenizers and tiny causal LMs (session-scoped).

Run the whole suite with `make test`; one file alone with `.venv/bin/python -m pytest tests/<file> -q`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from examples.local_models import make_causal_lm, python_docs_files, train_tokenizer

# plain asserts in the shared SLURM job helpers report their operands as the tests' own do
pytest.register_assert_rewrite("slurm_jobs")

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread():
    """Tiny in-process tensors run fastest on one thread; child processes choose their own."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def free_port() -> int:
    """Return a TCP port that is free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def docs_files() -> list[Path]:
    """A stable slice of the Python docs corpus (about 1 MB of English technical prose)."""
    return python_docs_files(limit=60)


@pytest.fixture(scope="session")
def bytelevel_tokenizer(tmp_path_factory, docs_files) -> Path:
    """Byte-level BPE (GPT-2/Llama-3 conventions) with a 2,048-token vocabulary."""
    return train_tokenizer(docs_files, tmp_path_factory.mktemp("tok_bl"), 2048, kind="byte_level")


@pytest.fixture(scope="session")
def metaspace_tokenizer(tmp_path_factory, docs_files) -> Path:
    """SentencePiece-style Metaspace BPE with byte fallback and a 2,048-token vocabulary."""
    return train_tokenizer(docs_files, tmp_path_factory.mktemp("tok_ms"), 2048, kind="metaspace")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, bytelevel_tokenizer) -> Path:
    """A tiny randomly initialised Llama (6 layers, d=64) saved as a HF checkpoint with its tokenizer."""
    return make_causal_lm(bytelevel_tokenizer, tmp_path_factory.mktemp("tiny_llama"), arch="llama")


# ---- a tiny teacher dataset, shared by the SLURM build, training and export tests -----------------
BUILD_OPTIONS = ("--seq-len", "64", "--samples-per-shard", "16", "--max-samples", "64")


@pytest.fixture(scope="session")
def build_inputs(docs_files) -> list[str]:
    """Four corpus files: a few dozen 64-token sequences, four 16-sample shards."""
    return [str(p) for p in docs_files[:4]]


@pytest.fixture(scope="session")
def teacher_dataset(tmp_path_factory, tiny_llama, build_inputs) -> Path:
    """Teacher shards of `tiny_llama` built by one plain process (the reference for the array build)."""
    out = tmp_path_factory.mktemp("shards") / "single"
    cmd = [sys.executable, "-m", "spellm_ds.cli", "build-shards", "--teacher", str(tiny_llama)]
    cmd += ["--input", *build_inputs, "--output", str(out), *BUILD_OPTIONS, "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


@pytest.fixture(scope="session")
def tok(tiny_llama):
    """The tiny Llama's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


@pytest.fixture(scope="session")
def table(tok):
    """The k=10 char table of the tiny Llama's tokenizer (every token of its vocabulary)."""
    from spellm_ds.charset import CharTable

    return CharTable.build(tok, k=10, vocab_size=len(tok))
