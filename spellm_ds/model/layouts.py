"""Where a causal LM keeps its parts: the layout registry per architecture and the attribute resolver.

`LAYOUTS` maps an HF `model_type` to attribute paths (from the causal LM) of the transformer body, its
decoder layers, the MLP inside one layer and the final norm; the lm_head is always
`get_output_embeddings()`. Llama, Qwen2 and Mistral are listed; any other model is probed (`_PROBE`:
`model`/`transformer`/`gpt_neox` bodies, `layers`/`h` lists, `mlp`/`feed_forward`, and
`norm`/`ln_f`/`final_layernorm` norms). Add a line to `LAYOUTS` for a model the probe does not fit.

`resolve_path(obj, "model.norm")` follows one such dotted path; the student (`spellm_ds.model.student`)
and the original tail (`spellm_ds.model.tail`) reach the model's parts through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from spellm_ds.errors import SpellmError


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where a causal LM keeps its parts, as dotted attribute paths."""

    body: str  # causal LM -> transformer body whose forward returns the final normed hidden state
    layers: str  # causal LM -> ModuleList of decoder layers
    mlp: str  # decoder layer -> its MLP (the trainable part of the last N layers)
    norm: str  # causal LM -> final norm (inside the body; located for export and checks)


LAYOUTS: dict[str, Layout] = {
    "llama": Layout(body="model", layers="model.layers", mlp="mlp", norm="model.norm"),
    "qwen2": Layout(body="model", layers="model.layers", mlp="mlp", norm="model.norm"),
    "mistral": Layout(body="model", layers="model.layers", mlp="mlp", norm="model.norm"),
}

_PROBE = {
    "body": ("model", "transformer", "gpt_neox"),
    "layers": ("layers", "h"),
    "mlp": ("mlp", "feed_forward"),
    "norm": ("norm", "ln_f", "final_layernorm", "final_layer_norm"),
}


def resolve_path(obj: Any, path: str) -> Any:
    """The object at dotted attribute `path` under `obj`, or None where a step is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layout(model: nn.Module) -> Layout:
    """The layout of an HF causal LM: from `LAYOUTS` by model_type, else by probing attributes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LAYOUTS:
        layout = LAYOUTS[model_type]
    else:
        body = next((b for b in _PROBE["body"] if isinstance(resolve_path(model, b), nn.Module)), None)
        layers = next(
            (
                f"{body}.{x}"
                for x in _PROBE["layers"]
                if body and isinstance(resolve_path(model, f"{body}.{x}"), nn.ModuleList)
            ),
            None,
        )
        first = resolve_path(model, layers)[0] if layers and len(resolve_path(model, layers)) else None
        mlp = next(
            (m for m in _PROBE["mlp"] if first is not None and isinstance(resolve_path(first, m), nn.Module)),
            None,
        )
        norm = next(
            (
                f"{body}.{n}"
                for n in _PROBE["norm"]
                if body and resolve_path(model, f"{body}.{n}") is not None
            ),
            None,
        )
        missing = [
            n for n, v in (("body", body), ("layers", layers), ("mlp", mlp), ("norm", norm)) if v is None
        ]
        if missing:
            raise SpellmError(
                f"model_type {model_type!r}: cannot locate {', '.join(missing)} by probing; "
                "add its layout to spellm_ds.model.layouts.LAYOUTS"
            )
        layout = Layout(body=body, layers=layers, mlp=mlp, norm=norm)
    for name, path in (("body", layout.body), ("layers", layout.layers), ("norm", layout.norm)):
        if resolve_path(model, path) is None:
            raise SpellmError(
                f"model_type {model_type!r}: layout path {name}={path!r} not found in the model"
            )
    if model.get_output_embeddings() is None:
        raise SpellmError(f"model_type {model_type!r} has no output embeddings (lm_head)")
    return layout
