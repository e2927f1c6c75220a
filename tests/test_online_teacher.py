"""The online teacher in one process (spellm_ds/model/teacher.py): the teacher's top-5 from the shared prefix.

Expected values come from a plain transformers forward of the untouched teacher checkpoint (float64
log-softmax), never from the online code. The 2-rank ZeRO-3 check against real shards is in
tests/test_train_online.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from spellm_ds.config.run import LossConfig
from spellm_ds.errors import SpellmError
from spellm_ds.model.student import build_spellm_model


def _reference(model_dir, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    top = logp.topk(5, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("trainable_layers", [0, 2, 6])
def test_online_teacher_is_the_untouched_teacher_after_the_mlps_moved(tiny_llama, trainable_layers):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2000, (2, 24), generator=gen)
    ref_ids, ref_lps = _reference(tiny_llama, ids)
    model = build_spellm_model(
        tiny_llama, k=4, num_chars=20, trainable_layers=trainable_layers, online_teacher=True
    )
    chars = torch.randint(1, 20, (2048, 4), generator=gen)
    model.set_loss(LossConfig(regularizer="kl_full", reg_chunk=7), chars, torch.ones(2048, dtype=torch.bool))
    with torch.no_grad():  # training moved the student's MLPs and heads; the teacher must not move
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    labels_only = model(ids, online_teacher=True)  # no positions to train on: top-k without losses
    assert labels_only.loss is None and labels_only.reg_loss is None
    out = model(ids, loss_mask=torch.ones_like(ids, dtype=torch.bool), online_teacher=True)
    np.testing.assert_array_equal(out.teacher_topk_ids.numpy(), ref_ids.numpy())
    ref16 = ref_lps.to(torch.float16)
    ulp = torch.from_numpy(np.spacing(np.abs(ref16.numpy()))).float()
    assert ((out.teacher_topk_logprobs - ref16.float()).abs() <= ulp).all()
    # Gradient reaches the student's trainable parameters only; the teacher copy has none to receive.
    out.loss.backward()
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert len(model.teacher.mlps) == trainable_layers
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if trainable_layers:
        assert float(out.reg_loss.detach()) > 1e-4  # the moved MLPs changed the student's distribution
    else:
        assert (
            abs(float(out.reg_loss.detach())) < 1e-5
        )  # heads only: the student's state is the teacher's (KL 0)


def test_kl_full_needs_the_online_teacher(tiny_llama):
    model = build_spellm_model(tiny_llama, k=4, num_chars=20, trainable_layers=1)
    chars = torch.ones(2048, 4, dtype=torch.long)
    with pytest.raises(SpellmError, match="kl_full needs the teacher's full distribution"):
        model.set_loss(LossConfig(regularizer="kl_full"), chars, torch.ones(2048, dtype=torch.bool))
    with pytest.raises(SpellmError, match="online_teacher=True needs a model built with the online teacher"):
        model(torch.zeros(1, 4, dtype=torch.long), online_teacher=True)
