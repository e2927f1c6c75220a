"""The SpeLLM student: an HF causal LM body plus k parallel char heads, with freezing and ZeRO-3 building.

Layouts. Where each architecture keeps its body, decoder layers, MLPs and final norm is
`spellm_ds.model.layouts` (`find_layout`, the registry `LAYOUTS` and a probe for other models).

Forward. The body is the HF module itself (rotary embeddings, causal mask, attention backends stay
HF's), called with `use_cache=False`; its `last_hidden_state` is the final *normed* hidden state. The
frozen prefix (embeddings + first L-N layers) runs under `torch.no_grad()`: a forward pre-hook on the
first trainable layer switches the caller's grad mode back on (only while `SpeLLMModel.forward` runs;
a direct call of `.body`, as generation makes, is left alone), and the surrounding `no_grad` block
restores the caller's mode on exit (also on error). Inside the last N layers the graph goes through the
frozen attention only because the trainable MLPs below need it. Backward therefore runs through the last
N layers only. HF gradient checkpointing of the body is not supported (it is not needed: activations
are kept for N layers only).

Losses run inside `SpeLLMModel.forward` when teacher tensors are given, so under ZeRO-3 everything,
the regularizer's use of the frozen (partitioned) lm_head included, happens inside one engine forward
where DeepSpeed's hooks gather parameters: `TokenRegularizer` owns no parameters and registers the
lm_head weight as its external parameter, so it is gathered exactly around the regularizer (DeepSpeed's
backward hooks may gather it once more, unused: the regularizer's input gradient is computed in
forward, see `spellm_ds.train.losses`).

Online teacher (`online_teacher=True`, `spellm_ds.model.teacher`): the model also holds a frozen copy of the
trained layers' original MLPs (`.teacher`, built inside the same ZeRO-3 `zero.Init`); a forward with
`online_teacher=True` records the input of layer L-N (a second forward pre-hook), runs the original tail on
it under no_grad after the body (once the grad hook is inactive) and trains against the teacher's top-K it
gives, as a shard would hold them; they are returned in the output.

Char heads start at zero (`head_init_std=0`): every head starts uniform (char loss k·ln|C| exactly),
so the first steps do not push random-spelling gradients into the pretrained MLPs (the heads move first;
the MLPs get char-loss gradient once the heads are non-zero, and regularizer gradient from step one),
ties in candidate selection go to the teacher's top-1, and the start is identical for any world size or
RNG state. `head_init_std>0` draws N(0, std²) from a fixed seed on rank 0 and broadcasts it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from spellm_ds.dtypes import torch_dtype
from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import read_json
from spellm_ds.model.layouts import find_layout, resolve_path
from spellm_ds.train import losses

# Keeps transformers' ZeRO-3 switch alive (it holds only a weak reference): while it lives,
# `from_pretrained` builds inside `deepspeed.zero.Init` and partitions at load.
_HF_DS_CONFIG: Any = None


@dataclass
class SpeLLMOutput(ModelOutput):
    """What `SpeLLMModel.forward` returns; the loss fields are set when teacher tensors are given.

    A `ModelOutput` (a dict of tensors), so DeepSpeed's ZeRO-3 hooks see every tensor in it.
    """

    hidden: Tensor | None = None  # [B, T, d] final normed hidden state
    char_logits: Tensor | None = None  # [B, T, k, |C|]
    loss: Tensor | None = None  # char_loss + reg_weight * reg_loss
    char_loss: Tensor | None = None
    reg_loss: Tensor | None = None  # None when the regularizer is off
    selected_ids: Tensor | None = None  # Long[B, T] token id trained on, -1 where masked / no candidate
    metrics: dict[str, Tensor] | None = None  # see `losses.char_metrics`, plus fallback_top1, char/reg_loss
    teacher_topk_ids: Tensor | None = None  # Long[B, T, K] the online teacher's top-K (online forward only)
    teacher_topk_logprobs: Tensor | None = None  # Float[B, T, K] their float16-rounded log-probs


class TokenRegularizer(nn.Module):
    """Chunked full-vocabulary regularizer on the frozen lm_head; owns no parameters (see module doc)."""

    def __init__(self, lm_head: nn.Module) -> None:
        super().__init__()
        # A plain attribute (not a submodule): the lm_head stays registered only under `base`.
        self.__dict__["_lm_head"] = lm_head
        weight = lm_head.weight
        if hasattr(weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    def forward(
        self,
        hidden: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        loss_mask: Tensor,
        kind: str,
        chunk: int,
        teacher_hidden: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(loss, fallback_top1) of the lm_head on `hidden` ([..., d]); kind "none" gives a zero loss."""
        weight = self._lm_head.weight
        out = losses.token_regularizer(
            hidden, weight, topk_ids, topk_logprobs, loss_mask, kind, chunk, teacher_hidden=teacher_hidden
        )
        return out.loss, out.fallback_top1


def _record_hook(owner: SpeLLMModel, target: nn.Module):
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Not the original tail's twin of this layer, which shares its hooks.
        if module is target and owner._record is not None:
            owner._record.append(args[0] if args else kwargs["hidden_states"])

    return hook


def _enable_grad_hook(owner: SpeLLMModel):
    def hook(module: nn.Module, args: Any) -> None:
        # Only inside SpeLLMModel.forward: a direct call of the body (e.g. with a KV cache) is left alone.
        if owner._grad_wanted is not None:
            torch.set_grad_enabled(owner._grad_wanted)

    return hook


class SpeLLMModel(nn.Module):
    """An HF causal LM (`.base`, HF names) plus k char heads (`.char_heads`) on its final normed state."""

    def __init__(
        self,
        base: nn.Module,
        k: int,
        num_chars: int,
        trainable_layers: int = 5,
        head_init_std: float = 0.0,
        online_teacher: bool = False,
    ) -> None:
        super().__init__()
        if k < 1 or num_chars < 2:
            raise SpellmError(f"k={k} and num_chars={num_chars} must be >= 1 and >= 2")
        self.base = base
        self.layout = find_layout(base)
        layers = resolve_path(base, self.layout.layers)
        n_layers = len(layers)
        if not 0 <= trainable_layers <= n_layers:
            raise SpellmError(
                f"trainable_layers={trainable_layers} must be between 0 and the {n_layers} decoder layers"
            )
        self.k, self.num_chars, self.trainable_layers = k, num_chars, trainable_layers
        d = base.config.hidden_size
        dtype = base.get_output_embeddings().weight.dtype
        self.char_heads = nn.Linear(d, k * num_chars, bias=False, dtype=dtype)
        self.init_char_heads(head_init_std)
        self.regularizer = TokenRegularizer(base.get_output_embeddings())

        for p in base.parameters():
            p.requires_grad_(False)
        first = n_layers - trainable_layers
        for layer in list(layers)[first:]:
            mlp = resolve_path(layer, self.layout.mlp)
            if mlp is None:
                raise SpellmError(f"decoder layer has no {self.layout.mlp!r} module ({type(layer).__name__})")
            for p in mlp.parameters():
                p.requires_grad_(True)
        self._grad_wanted: bool | None = None  # the caller's grad mode while forward runs the body
        if trainable_layers:
            layers[first].register_forward_pre_hook(_enable_grad_hook(self))
        # The online teacher (model.teacher): frozen original MLPs of the trained layers; the input of
        # layer L-N is recorded in `forward` and fed to them.
        self.teacher: nn.Module | None = None
        self._record: list[Tensor] | None = None
        if online_teacher:
            from spellm_ds.model.teacher import OnlineTeacher

            self.teacher = OnlineTeacher(self)
            if trainable_layers:
                layers[first].register_forward_pre_hook(_record_hook(self, layers[first]), with_kwargs=True)

        self.loss_cfg: Any = None
        self.register_buffer("token_chars", torch.zeros(0, k, dtype=torch.long), persistent=False)
        self.register_buffer("eligible", torch.zeros(0, dtype=torch.bool), persistent=False)

    @property
    def body(self) -> nn.Module:
        """The transformer body (embeddings, decoder layers, final norm)."""
        return resolve_path(self.base, self.layout.body)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers."""
        return resolve_path(self.base, self.layout.layers)

    @property
    def lm_head(self) -> nn.Module:
        """The original (frozen) output layer, for the regularizer and the entropy fallback."""
        return self.base.get_output_embeddings()

    @torch.no_grad()
    def init_char_heads(self, std: float = 0.0, seed: int = 0) -> None:
        """Set the char heads to zero (std=0) or N(0, std²) from `seed`; the same on every rank."""
        self._write_char_heads(lambda weight: _fill(weight, std, seed))

    @torch.no_grad()
    def set_char_heads(self, weight: Tensor) -> None:
        """Collective under ZeRO-3: set the char head weight [k·|C|, d] to rank 0's `weight`."""
        want = (self.k * self.num_chars, self.base.config.hidden_size)
        if tuple(weight.shape) != want:
            raise SpellmError(f"char head weight {tuple(weight.shape)} does not fit {want}")
        self._write_char_heads(lambda w: w.copy_(weight.to(w.dtype)))

    def _write_char_heads(self, write: Any) -> None:
        weight = self.char_heads.weight
        if hasattr(weight, "ds_id"):
            import deepspeed
            import torch.distributed as dist

            with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
                if dist.get_rank() == 0:
                    write(weight)
        else:
            write(weight)

    def param_groups(self, mlp_lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters: `heads`, then `mlps` (if any) with `lr_scale`."""
        heads = [p for p in self.char_heads.parameters() if p.requires_grad]
        mlps = [p for n, p in self.base.named_parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": heads, "name": "heads", "lr_scale": 1.0}]
        if mlps:
            groups.append({"params": mlps, "name": "mlps", "lr_scale": float(mlp_lr_scale)})
        return groups

    def set_loss(self, loss_cfg: Any, token_chars: Any, eligible: Any) -> None:
        """Configure the losses: `loss_cfg` has selection, tau, regularizer, reg_weight, reg_chunk
        (`spellm_ds.config.run.LossConfig`); `token_chars` [V, k] and `eligible` [V] come from a CharTable
        (`token_chars`, `decodable`)."""
        if loss_cfg.regularizer in losses.NEEDS_TEACHER_LOGITS and self.teacher is None:
            raise SpellmError(
                f"loss.regularizer={loss_cfg.regularizer} needs the teacher's full distribution: "
                "build the model with the online teacher (teacher: online)"
            )
        chars = torch.as_tensor(token_chars).long()
        elig = torch.as_tensor(eligible).bool()
        if chars.ndim != 2 or chars.shape[1] != self.k or elig.shape != chars.shape[:1]:
            raise SpellmError(
                f"char table {tuple(chars.shape)} / eligible {tuple(elig.shape)} does not fit k={self.k}"
            )
        if chars.numel() and (int(chars.max()) >= self.num_chars or int(chars.min()) < 0):
            raise SpellmError(f"char table holds symbol ids outside 0..{self.num_chars - 1}")
        lm_vocab = getattr(self.lm_head.weight, "ds_shape", self.lm_head.weight.shape)[0]
        if chars.shape[0] > lm_vocab:
            raise SpellmError(
                f"char table covers {chars.shape[0]} tokens but the lm_head has {lm_vocab} rows"
            )
        device = self.token_chars.device
        self.token_chars = chars.to(device)
        self.eligible = elig.to(device)
        self.loss_cfg = loss_cfg

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        topk_ids: Tensor | None = None,
        topk_logprobs: Tensor | None = None,
        loss_mask: Tensor | None = None,
        with_metrics: bool = True,
        online_teacher: bool = False,
    ) -> SpeLLMOutput:
        """Hidden state and char logits; with teacher tensors (and `set_loss` done) also loss and metrics.

        `online_teacher=True` computes the teacher's top-K here (the model must be built with it; given
        teacher tensors are ignored) and returns them in the output; loss and metrics follow only when
        `loss_mask` is given (the positions to train on), as offline they follow only teacher tensors.
        """
        if online_teacher and self.teacher is None:
            raise SpellmError("online_teacher=True needs a model built with the online teacher")
        self._grad_wanted = torch.is_grad_enabled()
        self._record = [] if online_teacher else None
        try:
            with torch.no_grad():
                out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self._grad_wanted = None
            recorded, self._record = self._record, None
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        b, t = hidden.shape[:2]
        char_logits = self.char_heads(hidden).view(b, t, self.k, self.num_chars)
        result = SpeLLMOutput(hidden=hidden, char_logits=char_logits)
        teacher_hidden = None
        if online_teacher:
            chunk = self.loss_cfg.reg_chunk if self.loss_cfg is not None else 1024
            layer_input = recorded[0] if recorded else hidden
            topk_ids, topk_logprobs, teacher_hidden = self.teacher(layer_input, hidden, attention_mask, chunk)
            result.teacher_topk_ids, result.teacher_topk_logprobs = topk_ids, topk_logprobs
            if loss_mask is None:  # no positions to train on (e.g. the warm start wants labels only)
                return result
        if topk_ids is None:
            return result
        return self._losses(result, topk_ids, topk_logprobs, loss_mask, with_metrics, teacher_hidden)

    def _losses(
        self,
        res: SpeLLMOutput,
        topk_ids: Tensor,
        topk_logprobs: Tensor | None,
        loss_mask: Tensor | None,
        metrics: bool,
        teacher_hidden: Tensor | None = None,
    ) -> SpeLLMOutput:
        cfg = self.loss_cfg
        if cfg is None:
            raise SpellmError("SpeLLMModel.set_loss(...) must be called before passing teacher tensors")
        if topk_logprobs is None:
            raise SpellmError("topk_logprobs is required with topk_ids")
        if loss_mask is None:
            loss_mask = torch.ones(topk_ids.shape[:-1], dtype=torch.bool, device=topk_ids.device)
        if self.token_chars.device != topk_ids.device:  # e.g. set before the engine placed the model
            self.token_chars = self.token_chars.to(topk_ids.device)
            self.eligible = self.eligible.to(topk_ids.device)
        char = losses.char_selection_loss(
            res.char_logits,
            topk_ids,
            topk_logprobs,
            loss_mask,
            self.token_chars,
            self.eligible,
            selection=cfg.selection,
            tau=cfg.tau,
        )
        kind = cfg.regularizer if cfg.reg_weight > 0 else "none"
        loss, reg_loss, fallback = char.loss, None, None
        if kind != "none" or metrics:
            reg_loss, fallback = self.regularizer(
                res.hidden, topk_ids, topk_logprobs, loss_mask, kind, cfg.reg_chunk, teacher_hidden
            )
            if kind != "none":
                loss = loss + cfg.reg_weight * reg_loss
            else:
                reg_loss = None
        res.loss, res.char_loss, res.reg_loss = loss, char.loss, reg_loss
        res.selected_ids = char.selected_ids.view(topk_ids.shape[:-1])
        if metrics:
            res.metrics = losses.char_metrics(res.char_logits.detach(), char, topk_logprobs)
            res.metrics["fallback_top1"] = fallback
            res.metrics["char_loss"] = char.loss.detach()
            if reg_loss is not None:
                res.metrics["reg_loss"] = reg_loss.detach()
        return res


def _fill(weight: Tensor, std: float, seed: int) -> None:
    if std > 0:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        weight.copy_(torch.randn(weight.shape, generator=gen, dtype=torch.float32) * std)
    else:
        weight.zero_()


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require grad, in module order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def zero_stage(ds_config: Mapping[str, Any] | str | os.PathLike | None) -> int:
    """The ZeRO stage of a DeepSpeed config (dict or JSON file); 0 when absent."""
    cfg = load_ds_config(ds_config)
    return int((cfg or {}).get("zero_optimization", {}).get("stage", 0))


def load_ds_config(ds_config: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    """A DeepSpeed config as a dict (reads a JSON file path)."""
    if ds_config is None or isinstance(ds_config, Mapping):
        return dict(ds_config) if ds_config is not None else None
    return read_json(ds_config, "DeepSpeed config")


def check_model(model_path: str | os.PathLike, trainable_layers: int) -> int:
    """Check a model directory and N before any process-group work; returns the decoder layer count."""
    from transformers import AutoConfig

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise SpellmError(f"model path {path} is not a HF model directory (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise SpellmError(f"cannot read {path}/config.json ({exc})") from exc
    n_layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    if n_layers and not 0 <= trainable_layers <= n_layers:
        raise SpellmError(
            f"trainable_layers={trainable_layers} must be in 0..{n_layers} (decoder layers of {path})"
        )
    return n_layers


def build_spellm_model(
    model_path: str | os.PathLike,
    k: int,
    num_chars: int,
    trainable_layers: int = 5,
    dtype: torch.dtype | str = torch.float32,
    ds_config: Mapping[str, Any] | str | os.PathLike | None = None,
    head_init_std: float = 0.0,
    online_teacher: bool = False,
) -> SpeLLMModel:
    """Load a local HF causal LM and wrap it; with a ZeRO-3 `ds_config` it is partitioned at load.

    `dtype` is a torch dtype or its name in `spellm_ds.dtypes` (float32, bfloat16, float16);
    `online_teacher` adds the frozen copy of the trained layers' original MLPs (`spellm_ds.model.teacher`).
    """
    global _HF_DS_CONFIG
    from transformers import AutoModelForCausalLM

    check_model(model_path, trainable_layers)
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype, "model dtype")
    cfg = load_ds_config(ds_config)
    if zero_stage(cfg) == 3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(cfg)
        base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
        # With ZeRO++ hpZ the Init inside from_pretrained built the secondary-partition group; a second
        # Init that is not handed that group tries to build it again and DeepSpeed asserts.
        from deepspeed.utils import groups

        hpz_group = getattr(groups, "_ZERO_PARAM_INTRA_PARALLEL_GROUP", None)
        with deepspeed.zero.Init(config_dict_or_path=cfg, zero_param_parallel_group=hpz_group):
            model = SpeLLMModel(base, k, num_chars, trainable_layers, head_init_std, online_teacher)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
        model = SpeLLMModel(base, k, num_chars, trainable_layers, head_init_std, online_teacher)
    return model
