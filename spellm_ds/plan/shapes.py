"""The shape of a decoder-only HF causal LM, read from its config.json, and its exact parameter counts.

Nothing is loaded but the config: parameter counts follow exactly from the tensor shapes that the
Llama, Mistral and Qwen2 layouts of `transformers` create. Notation as in `spellm_ds.plan.estimate`.

Parameters (exact):
    attention   = d·h·e + 2·d·g·e + h·e·d  (+ h·e + 2·g·e q/k/v biases: Qwen2, Llama attention_bias;
                                           + d o_proj bias: Llama attention_bias)
    mlp         = 3·d·f  (+ 2·f + d with Llama mlp_bias)
    layer       = attention + mlp + 2·d (two RMSNorm weights)
    base        = V·d (embedding) + L·layer + d (final norm) + V·d (lm_head, absent when tied)
    char heads  = d·k·C  (one bias-free [d, k·C] projection)
    total P     = base + char heads
    trainable T = char heads + N·mlp            frozen = P − T
    largest module = the module with the most direct parameters (embedding or lm_head at real sizes);
                     the same figure as DeepSpeed's `model_to_params`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import read_json

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The shape figures of a decoder-only HF causal LM that decide its parameter count."""

    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> ModelShape:
        """Read the fields of a Llama, Mistral or Qwen2 config.json dict (missing ones reported at once)."""
        arch = str(cfg.get("model_type", "")).lower()
        if arch not in SUPPORTED_ARCHS:
            raise SpellmError(
                f"{where}: model_type {cfg.get('model_type')!r} is not supported by plan "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        problems = [f"missing field {name!r}" for name in required if name not in cfg]
        for name in (*required, "num_key_value_heads", "head_dim"):
            value = cfg.get(name)
            if name in cfg and value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"field {name!r} must be a positive integer, got {value!r}")
        if problems:
            raise SpellmError(f"{where}: " + "; ".join(problems))
        d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or d // heads
        kv = cfg.get("num_key_value_heads") or heads
        if heads % kv:
            raise SpellmError(
                f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
            )
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            arch=arch,
            hidden_size=d,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            vocab_size=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or (arch == "llama" and attention_bias),
            o_bias=arch == "llama" and attention_bias,
            mlp_bias=arch == "llama" and bool(cfg.get("mlp_bias", False)),
        )

    @property
    def attention_params(self) -> int:
        """Parameters of one attention block (q, k, v, o projections and biases)."""
        d, qdim, kvdim = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        n = d * qdim + 2 * d * kvdim + qdim * d
        if self.qkv_bias:
            n += qdim + 2 * kvdim
        if self.o_bias:
            n += d
        return n

    @property
    def mlp_params(self) -> int:
        """Parameters of one SwiGLU MLP (gate, up, down)."""
        d, f = self.hidden_size, self.intermediate_size
        return 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two RMSNorm weights)."""
        return self.attention_params + self.mlp_params + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Input embedding parameters."""
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Separate lm_head parameters (0 when tied to the embedding)."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def base_params(self) -> int:
        """All parameters of the HF model (tied weights counted once)."""
        return (
            self.embedding_params
            + self.num_layers * self.layer_params
            + self.hidden_size
            + self.lm_head_params
        )

    @property
    def largest_module_params(self) -> int:
        """Direct parameters of the largest single module (what ZeRO-3 must gather whole)."""
        d, f = self.hidden_size, self.intermediate_size
        qdim, kvdim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        linears = [
            d * f + (f if self.mlp_bias else 0),
            f * d + (d if self.mlp_bias else 0),
            d * qdim + (qdim if self.qkv_bias else 0),
            d * kvdim + (kvdim if self.qkv_bias else 0),
            qdim * d + (d if self.o_bias else 0),
        ]
        return max(self.embedding_params, *linears)


def load_model_shape(path: str | Path) -> ModelShape:
    """Read an HF config.json (a file or a model directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    cfg = read_json(p, "HF model config")
    return ModelShape.from_hf_config(cfg, where=str(p))
