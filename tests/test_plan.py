"""`spellm-ds plan`: parameter counts and per-GPU figures from an HF config.json alone.

Checks the counts against (a) real HF models built from small Llama / Mistral / Qwen2 configs and
measured with DeepSpeed's own `model_to_params`, (b) hand arithmetic for Llama-3-8B and Llama-3-70B
(tests/data/*.json hold their published config.json fields); the model-state bytes against DeepSpeed's
`estimate_zero3_model_states_mem_needs` with the translation documented in spellm_ds/plan/estimate.py; the
traffic and fit figures against hand arithmetic; the CLI (text, --json, bad input).

Run alone: .venv/bin/python -m pytest tests/test_plan.py -q
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from spellm_ds.errors import SpellmError
from spellm_ds.plan.estimate import GIB, PlanInputs, make_plan
from spellm_ds.plan.shapes import ModelShape, load_model_shape

DATA = REPO_ROOT / "tests" / "data"
CFG_8B = DATA / "llama3_8b_config.json"
CFG_70B = DATA / "llama3_70b_config.json"

# Llama-3 published totals (base model, no char heads), recomputed by hand below.
LLAMA3_8B_PARAMS = 8_030_261_248
LLAMA3_70B_PARAMS = 70_553_706_496


def _hand_llama3(d: int, f: int, layers: int, heads: int, kv: int, vocab: int) -> dict[str, int]:
    """Plain arithmetic for an untied Llama-3 layout (no biases)."""
    head_dim = d // heads
    q = d * d
    k = d * kv * head_dim
    v = d * kv * head_dim
    o = d * d
    mlp = d * f + d * f + f * d
    norms = d + d
    layer = q + k + v + o + mlp + norms
    embed = vocab * d
    lm_head = vocab * d
    return {"layer": layer, "mlp": mlp, "base": embed + layers * layer + d + lm_head, "embed": embed}


def test_llama3_8b_counts_by_hand():
    """Llama-3-8B: 8,030,261,248 base parameters; trainable = 5 MLPs + char heads."""
    shape = load_model_shape(CFG_8B)
    hand = _hand_llama3(4096, 14336, 32, 32, 8, 128256)
    assert hand["base"] == LLAMA3_8B_PARAMS
    plan = make_plan(shape, PlanInputs(nodes=1, gpus_per_node=8))
    heads = 4096 * 10 * 105
    assert plan.base_params == hand["base"]
    assert plan.char_head_params == heads == 4_300_800
    assert plan.total_params == hand["base"] + heads
    assert plan.trainable_params == 5 * 176_160_768 + heads == 885_104_640
    assert plan.frozen_params == hand["base"] + heads - plan.trainable_params
    assert plan.largest_module_params == 128256 * 4096


def test_llama3_70b_on_4x8x80gb_by_hand():
    """Llama-3-70B on 4 nodes x 8 GPUs x 80 GiB: every memory and traffic figure by plain arithmetic."""
    d, f, vocab, kvdim = 8192, 28672, 128256, 8 * 128
    hand = _hand_llama3(d, f, 80, 64, 8, vocab)
    assert hand["base"] == LLAMA3_70B_PARAMS
    heads = d * 1050
    total = hand["base"] + heads
    trainable = heads + 5 * 3 * d * f
    w, hpz, seq = 32, 8, 4096

    plan = make_plan(load_model_shape(CFG_70B), PlanInputs(nodes=4, gpus_per_node=8, gpu_mem_gib=80))
    assert plan.total_params == total == 70_562_308_096
    assert plan.trainable_params == trainable == 3_531_816_960
    assert plan.frozen_params == 67_030_491_136
    # model states: bf16 params over 32, bf16 hpZ copy over 8, grads 2+4 and Adam 4+4+4 bytes per trainable
    assert plan.params_bytes == pytest.approx(2 * total / w, abs=1)
    assert plan.hpz_bytes == pytest.approx(2 * total / hpz, abs=1)
    assert plan.grads_bytes == pytest.approx(6 * trainable / w, abs=1)
    assert plan.optimizer_bytes == pytest.approx(12 * trainable / w, abs=1)
    assert plan.params_bytes / GIB == pytest.approx(4.107, abs=1e-3)
    assert plan.hpz_bytes / GIB == pytest.approx(16.43, abs=1e-2)
    # activations at micro-batch 1, seq 4096
    tail_token = 2 * (6 * d + 2 * kvdim + 4 * f) + 8
    assert plan.tail_activation_bytes == seq * 5 * tail_token
    assert plan.head_activation_bytes == seq * (4 * d + 12 * 1050)
    assert plan.transient_activation_bytes == seq * 2 * (3 * d + 2 * kvdim + 3 * f)
    assert plan.activation_fixed_bytes == 8 * 1024 * vocab
    # all-gather per GPU per step (grad_accum 1): forward = every param, backward = tail + heads + lm_head
    bwd = 5 * hand["layer"] + d + heads + vocab * d
    assert plan.gather_without_hpz.global_bytes == 2 * (total + bwd) * 31 // 32
    assert plan.gather_with_hpz.global_bytes == 2 * trainable * 31 // 32
    assert plan.gather_with_hpz.node_bytes == 2 * (total + bwd - trainable) * 7 // 8
    assert plan.gather_without_hpz.global_bytes / GIB == pytest.approx(136.96, abs=0.01)
    # verdict: fixed part + B x per-sample activations <= 80 GiB
    fixed = (
        2 * total / w
        + 2 * total / hpz
        + 18 * trainable / w
        + 2 * (vocab * d + hand["layer"])
        + 4 * GIB
        + 8 * 1024 * vocab
    )
    per_sample = seq * (5 * tail_token + 4 * d + 12 * 1050 + 2 * (3 * d + 2 * kvdim + 3 * f))
    assert plan.fits
    assert plan.max_micro_batch == int((80 * GIB - fixed) // per_sample) == 6
    assert plan.total_bytes == pytest.approx(fixed + per_sample, abs=8)


def test_tail_resident_trades_memory_for_backward_gathers():
    """Keeping the backward's params gathered (reuse distance): +2 B x P_bwd memory, forward-only traffic."""
    d, f, vocab = 8192, 28672, 128256
    hand = _hand_llama3(d, f, 80, 64, 8, vocab)
    heads = d * 1050
    total = hand["base"] + heads
    bwd = 5 * hand["layer"] + d + heads + vocab * d
    shape = load_model_shape(CFG_70B)
    base = make_plan(shape, PlanInputs(nodes=4, gpus_per_node=8, grad_accum=8))
    kept = make_plan(shape, PlanInputs(nodes=4, gpus_per_node=8, grad_accum=8, tail_resident=True))
    assert kept.gather_working_bytes - base.gather_working_bytes == 2 * bwd
    assert kept.gather_without_hpz.global_bytes == 2 * 8 * total * 31 // 32
    assert base.gather_without_hpz.global_bytes == 2 * 8 * (total + bwd) * 31 // 32


def test_exact_fallback_inference_memory_by_hand():
    """Llama-3-70B, N = 5, 2 x 2048 tokens: 5 original MLPs + K/V of 5 layers + layer L-N inputs."""
    d, f, kvdim = 8192, 28672, 8 * 128
    plan = make_plan(
        load_model_shape(CFG_70B), PlanInputs(nodes=4, gpus_per_node=8, seq_len=2048, micro_batch=2)
    )
    mlps = 5 * 3 * d * f * 2  # bf16
    kv = 5 * 2 * kvdim * 2 * 2048 * 2  # K and V, 5 layers, bf16, 2 x 2048 tokens
    inputs = d * 2 * 2 * 2048
    assert plan.exact_fallback_bytes == mlps + kv + inputs
    assert plan.exact_fallback_bytes / GIB == pytest.approx(6.703125)
    training = plan.model_state_bytes + plan.gather_working_bytes + plan.activation_bytes + plan.reserve_bytes
    assert plan.total_bytes == training  # not part of the training total
    assert plan.to_dict()["exact_fallback_bytes"] == plan.exact_fallback_bytes


def test_does_not_fit_reports_zero_micro_batch():
    """70B on one 8 x 40 GiB node without hpZ: parameters alone exceed memory."""
    plan = make_plan(load_model_shape(CFG_70B), PlanInputs(nodes=1, gpus_per_node=8, gpu_mem_gib=16))
    assert not plan.fits
    assert plan.max_micro_batch == 0
    assert plan.hpz_bytes == 0  # one node: no hpZ by default


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_type": "llama"},
        {"model_type": "llama", "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
        {"model_type": "mistral", "head_dim": 32},
        {"model_type": "qwen2", "tie_word_embeddings": True},
        {"model_type": "qwen2", "tie_word_embeddings": False},
    ],
)
def test_counts_match_deepspeed_model_to_params(overrides):
    """Total and largest-module parameters equal DeepSpeed's `model_to_params` on the built HF model."""
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        **overrides,
    }
    hf_cfg = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    ds_total, ds_largest = model_to_params(model)
    shape = ModelShape.from_hf_config(hf_cfg.to_dict())
    assert shape.base_params == ds_total
    assert shape.largest_module_params == ds_largest


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 8), (4, 8), (16, 8)])
def test_model_states_match_deepspeed_estimator(nodes, gpus):
    """Model states vs `estimate_zero3_model_states_mem_needs` (no offload) with the documented translation.

    DeepSpeed assumes every parameter trains and charges 18 B/param / world + 4 B x largest module. For
    the trainable subset T our figure is 20 B/param / world (its 18 plus the bf16 gradient buffer), and
    the frozen rest costs 2 B/param / world: ours = DS(T) - 4 x largest(T) + 2T/W + 2(P - T)/W.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    for cfg in (CFG_8B, CFG_70B):
        plan = make_plan(load_model_shape(cfg), PlanInputs(nodes=nodes, gpus_per_node=gpus, hpz=1))
        w = nodes * gpus
        t, p = plan.trainable_params, plan.total_params
        largest_t = 8192 * 28672 if cfg == CFG_70B else 4096 * 14336  # an MLP projection
        _, ds_gpu, ds_largest_mem = estimate_zero3_model_states_mem_needs(
            total_params=t,
            largest_layer_params=largest_t,
            num_gpus_per_node=gpus,
            num_nodes=nodes,
            cpu_offload=False,
        )
        ours = plan.params_bytes + plan.grads_bytes + plan.optimizer_bytes
        translated = ds_gpu - ds_largest_mem + 2 * t / w + 2 * (p - t) / w
        assert ours == pytest.approx(translated, abs=4), (cfg.name, nodes)
        # the all-parameters view: DeepSpeed's 18 B/param on P
        _, ds_all, ds_all_largest = estimate_zero3_model_states_mem_needs(
            total_params=p,
            largest_layer_params=plan.largest_module_params,
            num_gpus_per_node=gpus,
            num_nodes=nodes,
            cpu_offload=False,
        )
        assert ds_all - ds_all_largest == pytest.approx(18 * p / w, abs=1)
        assert ours < ds_all - ds_all_largest  # training 5% of the weights needs far less


def test_hpz_must_stay_inside_a_node():
    """An hpZ size that does not divide the GPUs per node is refused with the field named."""
    with pytest.raises(SpellmError, match="hpz"):
        PlanInputs(nodes=4, gpus_per_node=8, hpz=3)


def test_too_many_trainable_layers_is_an_error():
    """N larger than the model's layer count names both numbers."""
    with pytest.raises(SpellmError, match="trainable_layers 40 exceeds the model's 32"):
        make_plan(load_model_shape(CFG_8B), PlanInputs(nodes=1, gpus_per_node=8, trainable_layers=40))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spellm_ds.cli", "plan", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_text_and_json(tmp_path):
    """The CLI prints the report and the same figures as JSON."""
    out = _cli("--model-config", str(CFG_70B), "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem-gb", "80")
    assert out.returncode == 0, out.stderr
    assert "70,562,308,096" in out.stdout
    assert "FITS at micro-batch 1; largest micro-batch that fits: 6" in out.stdout
    # 5 original MLPs (6.56 GiB) + K/V of 5 layers and layer L-N inputs for 1 x 4096 tokens
    assert "exact fallback, inference       6.70 GiB   (not in total: 5 original MLPs + KV" in out.stdout
    js = _cli("--model-config", str(CFG_70B), "--nodes", "4", "--gpus-per-node", "8", "--json")
    data = json.loads(js.stdout)
    assert data["trainable_params"] == 3_531_816_960
    assert data["fits"] is True
    assert data["inputs"]["hpz"] == 8
    assert data["gather_with_hpz"]["global_bytes"] < data["gather_without_hpz"]["global_bytes"]


def test_cli_bad_config_exits_2(tmp_path):
    """Missing fields and an unsupported model type: exit code 2 and a message naming file and field."""
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    out = _cli("--model-config", str(bad), "--nodes", "1", "--gpus-per-node", "1")
    assert out.returncode == 2
    assert str(bad) in out.stderr and "'intermediate_size'" in out.stderr and "'vocab_size'" in out.stderr
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    out = _cli("--model-config", str(bad), "--nodes", "1", "--gpus-per-node", "1")
    assert out.returncode == 2 and "model_type 'gpt2' is not supported" in out.stderr
    out = _cli("--model-config", str(tmp_path / "missing.json"), "--nodes", "1", "--gpus-per-node", "1")
    assert out.returncode == 2 and "missing.json" in out.stderr


def test_online_teacher_memory_and_flops_by_hand():
    """--online: the N original MLP copies are frozen params; the teacher's FLOPs per token by arithmetic."""
    model = load_model_shape(CFG_70B)
    inputs = dict(nodes=4, gpus_per_node=8, seq_len=2048, micro_batch=1, trainable_layers=5)
    off = make_plan(model, PlanInputs(**inputs))
    on = make_plan(model, PlanInputs(**inputs, online=True))
    d, f, layers, heads, vocab, e = 8192, 28672, 80, 64, 128256, 128
    copy = 5 * 3 * d * f  # five [d, f] MLPs of three matrices each
    assert on.online_teacher_params == copy and off.online_teacher_params == 0
    assert on.params_bytes == math.ceil(2 * (on.total_params + copy) / 32)
    assert on.hpz_bytes == math.ceil(2 * (on.total_params + copy) / 8)
    assert on.online_teacher_bytes == math.ceil(2 * copy / 32) + math.ceil(2 * copy / 8)
    assert (
        on.total_bytes - off.total_bytes == on.params_bytes - off.params_bytes + on.hpz_bytes - off.hpz_bytes
    )
    layer = 2 * d * d + 2 * d * 8 * e + 3 * d * f + 2 * d  # q, o, k, v (8 KV heads), MLP, two norms
    attention = 2 * 2048 * heads * e
    assert on.online_teacher_flops_per_token == 2 * (5 * layer + vocab * d) + 5 * attention
    assert on.teacher_forward_flops_per_token == 2 * (layers * layer + vocab * d) + layers * attention
    assert 0.06 < on.online_teacher_flops_per_token / on.teacher_forward_flops_per_token < 0.08
