"""The online teacher: the teacher's prediction computed inside the training step, without shards.

The student is the teacher with the MLPs of its last N layers retrained, so below layer L-N both
compute the same activations. `OnlineTeacher` keeps a frozen copy of the original MLPs of those N
layers (`mlps`, built from the pretrained weights when the model is built; under ZeRO-3 they are created
inside the same `deepspeed.zero.Init` as every other parameter, so they are partitioned like any frozen
weight). In each forward of `spellm_ds.model.student.SpeLLMModel` the shared prefix runs once; the input of
layer L-N is recorded and fed to the original tail (`spellm_ds.model.tail.run_original_tail`, the same code as
inference's exact fallback) under `no_grad`, and the lm_head on its output gives the teacher's logits.

What the losses receive is what a teacher shard would hold: per position the top-K token ids sorted
by descending log-probability and their full-vocabulary log-softmax rounded to float16 (then widened
to float32, as the shard reader does), computed over chunks of `chunk` positions so no `[N, V]` logits
exist at once. The teacher's final hidden state is returned too, for the `kl_full` regulariser, which
recomputes the teacher's logits chunk by chunk next to the student's (`spellm_ds.train.losses`).

Cost per token, next to a shard-building pass: N decoder layers and the lm_head again, instead of a
whole teacher forward (`spellm-ds plan --online` prints the figures).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from spellm_ds.errors import SpellmError
from spellm_ds.model.tail import check_attention, run_original_tail


def _partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def frozen_copy(mlp: nn.Module, config: Any) -> nn.Module:
    """A frozen copy of one MLP with the same weights; under ZeRO-3 a new, partitioned module.

    Collective under ZeRO-3 (call it inside the `deepspeed.zero.Init` the model is built in).
    """
    if not _partitioned(mlp):
        return copy.deepcopy(mlp).requires_grad_(False)
    import deepspeed

    try:
        twin = type(mlp)(config)
    except TypeError as exc:
        raise SpellmError(
            f"online teacher: cannot build a copy of {type(mlp).__name__} from the model config ({exc})"
        ) from None
    src, dst = dict(mlp.named_parameters()), dict(twin.named_parameters())
    shapes = {n: tuple(p.ds_shape) for n, p in src.items()}
    got = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in dst.items()}
    if shapes != got:
        raise SpellmError(f"online teacher: a new {type(mlp).__name__} has parameters {got}, not {shapes}")
    params = [src[n] for n in sorted(src)] + [dst[n] for n in sorted(dst)]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        for name in src:
            dst[name].copy_(src[name].to(dst[name].dtype))
    return twin.requires_grad_(False)


def topk_logprobs(hidden: Tensor, weight: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Top-k ids Long[N, k] and float16-rounded log-softmax values Float32[N, k] of `hidden @ weight.T`.

    Rows are processed `chunk` at a time, in float32; values are rounded to float16 exactly as the
    shard writer stores them and widened back, as the shard reader gives them.
    """
    n = hidden.shape[0]
    ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)
    lps = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk):
        z = (hidden[s : s + chunk] @ weight.t()).float()
        vals, idx = torch.topk(z, k, dim=-1)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        ids[s : s + chunk] = idx
        lps[s : s + chunk] = (vals - lse).clamp_(max=0.0).to(torch.float16).float()
    return ids, lps


class OnlineTeacher(nn.Module):
    """Frozen original MLPs of the trained layers plus the frozen lm_head: the teacher inside training."""

    def __init__(self, owner: nn.Module, top_k: int = 5) -> None:
        super().__init__()
        if top_k < 1:
            raise SpellmError(f"online teacher: top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        # Plain attributes, not submodules: the owner holds this module, and the lm_head lives in `base`.
        self.__dict__["_owner"] = owner
        self.first = len(owner.layers) - owner.trainable_layers
        if owner.trainable_layers:
            check_attention(owner.base.config, "the online teacher")
        config = owner.base.config
        tail = list(owner.layers)[self.first :]
        self.mlps = nn.ModuleList(frozen_copy(getattr(layer, owner.layout.mlp), config) for layer in tail)
        weight = owner.lm_head.weight
        if hasattr(weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    def forward(
        self, layer_input: Tensor, student_hidden: Tensor, key_mask: Tensor | None, chunk: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(top-k ids Long[B, T, K], log-probs Float[B, T, K], final normed hidden [B, T, d]) of the teacher.

        `layer_input` is the input of layer L-N recorded in the student's forward; with N = 0 the
        student's own `student_hidden` is the teacher's.
        """
        owner = self._owner
        b, t = student_hidden.shape[:2]
        with torch.no_grad():
            if len(self.mlps):
                keys = (
                    torch.ones(b, t, dtype=torch.bool, device=layer_input.device)
                    if key_mask is None
                    else key_mask.bool()
                )
                position = torch.arange(t, device=layer_input.device).expand(b, t)  # the body's default
                hidden = run_original_tail(owner, self.mlps, self.first, layer_input, position, keys)
            else:
                hidden = student_hidden.detach()
            weight = owner.lm_head.weight
            ids, lps = topk_logprobs(hidden.reshape(b * t, -1), weight, self.top_k, chunk)
        return ids.view(b, t, -1), lps.view(b, t, -1), hidden
