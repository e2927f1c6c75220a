"""The teacher's numerics for shard building: a HF causal LM's top-k log-softmax per position.

`Teacher` loads any local HF causal LM and returns, per position, the ids and float16 log-probs of its k
most likely next tokens. The top-k comes either from the model's own logits (``full``) or, when
``lm_head(final hidden state)`` reproduces them, from `streamed_topk` over the output layer in blocks
(``chunked``), so the full logits of a batch never exist at once; `topk_rows` is the exact row-wise
top-k both use. `resolve_device` and `resolve_dtype` turn the builder's ``auto`` choices into a device and
a dtype name. torch and transformers are imported only when a teacher runs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from spellm_ds.errors import SpellmError

# Config fields that post-process the final logits: the chunked head path cannot reproduce them.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
    "logit_softcapping",
)


def resolve_device(device: str, local_rank: int = 0) -> str:
    """Return the torch device string for `device` ("auto" picks cuda:<local rank> when usable)."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SpellmError(f"--device {device}: CUDA is not available")
        return device
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """Return the concrete teacher dtype name for `dtype` on `device`."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


class Teacher:
    """A HF causal LM that returns the top-k log-softmax of its next-token distribution per position."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        device_map: str | None = None,
        top_k: int = 5,
        head: str = "auto",
    ) -> None:
        from transformers import AutoModelForCausalLM

        from spellm_ds.dtypes import torch_dtype

        self.top_k = top_k
        kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, "--dtype")}
        if device_map:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as exc:
            raise SpellmError(f"--teacher {path}: cannot load a causal LM ({exc})") from None
        if not device_map:
            model = model.to(device)
        model.eval()
        self.model = model
        self.input_device = model.get_input_embeddings().weight.device
        out = model.get_output_embeddings()
        self.vocab_size = int(out.weight.shape[0]) if out is not None else int(_text_config(model).vocab_size)
        cuda = self.input_device.type == "cuda"
        # Logits that exist at once (elements): 64 MiB of float32 on CPU, 1 GiB on GPU.
        self.block = 1 << (28 if cuda else 24)
        self.head_mode = self._choose_head(head)

    def _chunkable(self) -> bool:
        import torch

        out = self.model.get_output_embeddings()
        cfg = _text_config(self.model)
        post = [k for k in _LOGIT_POSTPROCESSING if getattr(cfg, k, None) not in (None, 0, 1, 1.0, False)]
        return isinstance(out, torch.nn.Linear) and self.model.base_model is not self.model and not post

    def _choose_head(self, head: str) -> str:
        import torch

        if head == "full":
            return "full"
        if not self._chunkable():
            if head == "chunked":
                raise SpellmError("--head chunked: this teacher post-processes its logits; use --head full")
            return "full"
        # Probe: the chunked head must reproduce the model's own logits on a fixed input.
        ids = (torch.arange(16, device=self.input_device) % self.vocab_size)[None]
        with torch.inference_mode():
            ref = self.model(input_ids=ids, use_cache=False).logits[0].float()
            hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
            head_mod = self.model.get_output_embeddings()
            got = head_mod(hidden.to(head_mod.weight.device)).float().to(ref.device)
        tol = (1e-3 if head_mod.weight.dtype == torch.float32 else 3e-2) * (1.0 + float(ref.abs().max()))
        ok = got.shape == ref.shape and float((got - ref).abs().max()) <= tol
        if not ok and head == "chunked":
            raise SpellmError("--head chunked: lm_head(final hidden state) differs from the model's logits")
        return "chunked" if ok else "full"

    def forward_logits(self, input_ids: np.ndarray) -> Any:
        """Run the plain HF forward on a batch and return its logits tensor [B, L, V]."""
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.input_device)
        with torch.inference_mode():
            return self.model(input_ids=ids, use_cache=False).logits

    def topk(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (ids int32 [B, L, K], log-probs float16 [B, L, K]) of the next-token distribution."""
        import torch

        b, n = input_ids.shape
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.input_device)
        with torch.inference_mode():
            if self.head_mode == "chunked":
                head = self.model.get_output_embeddings()
                hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                hidden = hidden.reshape(b * n, -1).to(head.weight.device)
                top_ids, top_lp = streamed_topk(hidden, head.weight, head.bias, self.top_k, self.block)
            else:
                logits = self.model(input_ids=ids, use_cache=False).logits.reshape(b * n, -1)
                top_ids = torch.empty(b * n, self.top_k, dtype=torch.int64, device=logits.device)
                top_lp = torch.empty(b * n, self.top_k, dtype=torch.float16, device=logits.device)
                rows = max(1, self.block // self.vocab_size)
                for s in range(0, b * n, rows):
                    top_ids[s : s + rows], top_lp[s : s + rows] = _reduce(logits[s : s + rows], self.top_k)
            out_ids = top_ids.to(torch.int32).cpu().numpy().reshape(b, n, self.top_k)
            out_lp = top_lp.cpu().numpy().reshape(b, n, self.top_k)
        return out_ids, out_lp


_TOPK_GROUP = 64


def topk_rows(x: Any, k: int) -> tuple[Any, Any]:
    """Exact top-k (values, indices) along the rows of a 2-D tensor, as `torch.topk(x, k, dim=-1)` gives."""
    import torch

    # On CPU over wide rows, via group maxima (~3x faster than torch.topk); elsewhere torch.topk itself.

    n, width = x.shape
    if x.is_cuda or width < 128 * _TOPK_GROUP or k > width // _TOPK_GROUP:
        return torch.topk(x, k, dim=-1)
    # The top-k values lie in the k groups with the largest maxima: find those groups, then search them.
    g = _TOPK_GROUP
    body = (width // g) * g
    groups = x[:, :body].view(n, body // g, g)
    top_groups = torch.topk(groups.amax(dim=-1), k, dim=-1).indices
    cand = torch.gather(groups, 1, top_groups.unsqueeze(-1).expand(n, k, g)).reshape(n, k * g)
    vals, pos = torch.topk(cand, k, dim=-1)
    idx = torch.gather(top_groups, 1, pos // g) * g + pos % g
    if body < width:  # the columns after the last whole group
        tail_v, tail_i = torch.topk(x[:, body:], min(k, width - body), dim=-1)
        vals, sel = torch.topk(torch.cat([vals, tail_v], dim=1), k, dim=-1)
        idx = torch.gather(torch.cat([idx, tail_i + body], dim=1), 1, sel)
    return vals, idx


def _reduce(logits: Any, k: int) -> tuple[Any, Any]:
    """Top-k ids and log-softmax values (float16) of each row of a logits block; consumes the block."""
    import torch

    # A float32 copy is made only for 16-bit logits; float32 logits (a private block) are reused in place.
    x = logits if logits.dtype == torch.float32 and logits.is_contiguous() else logits.float()
    vals, idx = topk_rows(x, k)
    m = vals[:, :1]
    # log-sum-exp shifted by the row max (= top-1 value): one in-place subtract, one in-place exp, one sum.
    lse = m + torch.log(x.sub_(m).exp_().sum(dim=-1, keepdim=True))
    # fp32 rounding can put the top value a hair above the log-sum-exp: clamp to <= 0.
    return idx, (vals - lse).clamp_(max=0.0).to(torch.float16)


def streamed_topk(
    hidden: Any, weight: Any, bias: Any, k: int, block: int, slice_vocab: bool | None = None
) -> tuple[Any, Any]:
    """Top-k ids and float16 log-softmax of `hidden @ weight.T (+ bias)` without the full logits.

    At most about `block` logits exist at once. On GPU the vocabulary is cut into slices whose top-k
    and shifted sums of exp are merged (the weight is read once); on CPU rows are cut into blocks over
    the whole vocabulary (large blocks, so re-reading the weight per block stays cheap, and wide rows
    suit the group-maximum top-k). `slice_vocab` forces one strategy (default: by device).
    """
    import torch

    linear = torch.nn.functional.linear
    rows, vocab = hidden.shape[0], weight.shape[0]
    if rows * vocab <= block:
        return _reduce(linear(hidden, weight, bias), k)
    if not (hidden.is_cuda if slice_vocab is None else slice_vocab):
        step = max(1, block // vocab)
        parts = [_reduce(linear(hidden[r : r + step], weight, bias), k) for r in range(0, rows, step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    width = max(min(vocab, 1024), block // rows)
    best_v = best_i = run_m = run_s = None
    for v0 in range(0, vocab, width):
        b = bias[v0 : v0 + width] if bias is not None else None
        x = linear(hidden, weight[v0 : v0 + width], b)
        x = x if x.dtype == torch.float32 else x.float()
        vals, idx = torch.topk(x, min(k, x.shape[1]), dim=-1)
        idx += v0
        if best_v is None:
            best_v, best_i, run_m = vals, idx, vals[:, :1].clone()
            run_s = x.sub_(run_m).exp_().sum(dim=-1, keepdim=True)
            continue
        best_v, sel = torch.topk(torch.cat([best_v, vals], dim=1), k, dim=-1)
        best_i = torch.gather(torch.cat([best_i, idx], dim=1), 1, sel)
        new_m = torch.maximum(run_m, vals[:, :1])
        run_s = run_s * torch.exp(run_m - new_m) + x.sub_(new_m).exp_().sum(dim=-1, keepdim=True)
        run_m = new_m
    lse = run_m + torch.log(run_s)
    return best_i, (best_v - lse).clamp_(max=0.0).to(torch.float16)


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
