"""Per-GPU memory and communication plan for distilling an HF causal LM under ZeRO-3, from its config.json.

Nothing is loaded but the config: parameter counts follow exactly from the tensor shapes that the
Llama, Mistral and Qwen2 layouts of `transformers` create. Memory is in bytes per GPU (printed in GiB,
2^30 bytes; `--gpu-mem-gb` is read as GiB, the unit `nvidia-smi` reports in).

Notation: d hidden size, f FFN size, L layers, h heads, g key/value heads, e head dim, V vocabulary,
k char heads, C charset size, N trainable (tail) layers, W = nodes × GPUs per node (ZeRO-3 partition
group), H the hpZ node-local partition size (1 = off), B micro-batch, S sequence length, A gradient
accumulation steps.

Parameter counts: `spellm_ds.plan.shapes` (exact, from the config's tensor shapes).

Model states per GPU (ZeRO-3, bf16 weights, fp32 Adam; DeepSpeed keeps optimizer state only for
parameters that require grad):
    params      = 2·P / W                   bf16 primary partition, all parameters
    hpZ copy    = 2·P / H  (H > 1)          ZeRO++ secondary partition inside the node; frozen params
                                            keep theirs for the whole run, trainable ones rebuild it
                                            after every optimizer step
    gradients   = (2 + 4)·T / W             bf16 reduce-scatter partition + its fp32 copy at step time
    optimizer   = (4 + 4 + 4)·T / W         fp32 master weights + Adam m + Adam v
    DeepSpeed's `estimate_zero3_model_states_mem_needs` (no offload) assumes every parameter trains
    and charges 18·P/W + 4·largest_module: its 18 bytes are our 2 + 4 + 12 without the 2-byte bf16
    gradient buffer, so with T = P ours = DeepSpeed's − 4·largest_module + 2·P/W (tested).
    gather working set = 2·(largest module + layer): one module gathered in full plus the next decoder
                         layer prefetched. With `tail_resident` (a `stage3_max_reuse_distance` above
                         the backward's P_bwd, as ds_configs/zero3_70b_multinode.json sets) the P_bwd
                         parameters stay gathered from their forward use to the backward: + 2·P_bwd.

Activations per GPU (bf16, fused/flash attention so no S² term, no activation checkpointing):
    tail layer (with grad), saved per token = 2·(6·d + 2·g·e + 4·f) + 8 bytes
        residual in, norm out, q, k, v, attention out, residual mid, norm out (6·d + 2·g·e), gate, up,
        SiLU(gate), product (4·f), two fp32 RMSNorm inverse-rms (8 bytes); charged to all N layers
        (the first one needs only its MLP's share: an upper bound).
    head, per token = 2·2·d + 3·4·k·C        final norm in/out, char logits, log-softmax and their
                                            gradient in fp32
    one-layer transient, per token = 2·(3·d + 2·g·e + 3·f)
        a frozen-prefix layer under no-grad (nothing saved, one layer alive at a time), and equally
        the gradient buffers of one layer during backward
    regulariser chunk (fixed) = 2·4·R·V        R = tokens per chunk of the frozen-lm_head regulariser:
                                            fp32 logits and their gradient
    peak = B·S·(N·tail + head + transient) + chunk

Inference with the exact fallback (spellm_ds.inference.fallback), not part of the training figures: beside the
model, the GPU that holds its last N layers keeps the original MLPs of those layers, the original tail's
own KV cache and the recorded inputs of layer L-N, in bf16 for B sequences of S tokens (the plan's
micro-batch and sequence length):
    exact fallback = 2·N·mlp + 2·2·N·g·e·B·S + 2·d·B·S
                     original MLPs, K and V of N layers, layer L-N inputs (an upper bound: a sequence
                     keeps them only for positions the original tail has not processed yet)

Online teacher (`teacher: online`, `--online`): the model also holds a frozen copy of the N original
MLPs (partitioned like every frozen parameter), and every micro-batch runs the last N layers and the
lm_head a second time, without grad:
    teacher copy         = N·mlp parameters, 2·N·mlp / W bytes per GPU (+ 2·N·mlp / H with hpZ), in `params`
    attention per token  = 2·S·h·e per layer (QK^T and AV, 2 FLOPs per multiply-add, S/2 keys on average)
    teacher forward      = 2·(L·layer + V·d) + L·attention   FLOPs per token (what building shards costs)
    online teacher       = 2·(N·layer + V·d) + N·attention   FLOPs per token (per training pass over it)
    (`kl_full` adds one more V·d product per token: 2·V·d.)

Fit: model states + gather working set + activations + reserve (CUDA context, NCCL buffers,
allocator fragmentation; default 4 GiB) ≤ GPU memory. Activations are linear in B, so the largest
micro-batch that fits is ⌊(GPU memory − everything else) / (peak activations per sample)⌋.

All-gather traffic, bytes received per GPU per optimizer step (A micro-batches). Every micro-batch
gathers all P parameters for the forward and P_bwd = N·layer + d + d·k·C + V·d (tail layers, final norm,
char heads and the frozen lm_head that the regulariser backpropagates through) for the backward:
    (P_bwd counts 0 with `tail_resident`: the backward finds them still gathered.)
    without hpZ: over all W ranks (crossing nodes)  2·A·(P + P_bwd)·(W−1)/W
    with hpZ:    over all W ranks                   2·T·(W−1)/W  (trainable params after each step)
                 inside the node, H ranks           2·(A·(P + P_bwd) − T)·(H−1)/H
                 plus once, at the first step       2·(P − T)·(W−1)/W (frozen params)
    gradient reduce-scatter (both)                  2·A·T·(W−1)/W
Times divide these by an assumed per-GPU bus bandwidth (inter-node for groups that span nodes,
NVLink-class intra-node otherwise); they are rough floors, not predictions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from spellm_ds.config.schema import Section, positive
from spellm_ds.errors import SpellmError
from spellm_ds.plan.shapes import ModelShape

GIB = 1024**3

BF16 = 2
FP32 = 4
GRAD_BYTES = BF16 + FP32  # bf16 reduce-scatter partition + fp32 copy made at step time
OPTIM_BYTES = FP32 * 3  # fp32 master + Adam m + Adam v


@dataclass(kw_only=True)
class PlanInputs(Section):
    """Cluster size and run shape the plan is made for."""

    nodes: int = field(metadata={"help": "nodes in the job"})
    gpus_per_node: int = field(metadata={"help": "GPUs per node"})
    gpu_mem_gib: float = field(
        default=80.0, metadata={"help": "memory per GPU in GiB", "flag": "--gpu-mem-gb"}
    )
    seq_len: int = field(default=4096, metadata={"help": "tokens per sequence"})
    micro_batch: int = field(default=1, metadata={"help": "sequences per GPU per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step (traffic)"})
    trainable_layers: int = field(
        default=5, metadata={"help": "N: the MLPs of the last N decoder layers train"}
    )
    k: int = field(default=10, metadata={"help": "char heads"})
    num_chars: int = field(default=105, metadata={"help": "charset size |C|"})
    hpz: int | None = field(
        default=None,
        metadata={
            "help": "hpZ (node-local secondary partition) size; unset: GPUs per node on >1 node, else off"
        },
    )
    reg_chunk_tokens: int = field(
        default=1024, metadata={"help": "tokens per chunk of the lm_head regulariser", "flag": "--reg-chunk"}
    )
    tail_resident: bool = field(
        default=False,
        metadata={
            "help": "the trainable tail stays gathered from forward to backward (stage3_max_reuse_distance)"
        },
    )
    reserve_gib: float = field(
        default=4.0, metadata={"help": "GiB kept for CUDA, NCCL and fragmentation", "flag": "--reserve-gb"}
    )
    inter_node_gbs: float = field(
        default=50.0, metadata={"help": "per-GPU bus bandwidth across nodes, GB/s (400 Gb/s NIC per GPU)"}
    )
    intra_node_gbs: float = field(
        default=300.0, metadata={"help": "per-GPU bus bandwidth inside a node, GB/s (NVLink class)"}
    )
    online: bool = field(
        default=False,
        metadata={
            "help": "teacher: online: add the frozen copy of the N original MLPs and the teacher's FLOPs "
            "per token"
        },
    )

    def problems(self) -> list[str]:
        problems: list[str] = []
        for name in ("nodes", "gpus_per_node", "seq_len", "micro_batch", "grad_accum", "k", "num_chars"):
            positive(problems, f"plan.{name}", getattr(self, name))
        for name in ("gpu_mem_gib", "inter_node_gbs", "intra_node_gbs", "reg_chunk_tokens"):
            positive(problems, f"plan.{name}", getattr(self, name))
        positive(problems, "plan.trainable_layers", self.trainable_layers, allow_zero=True)
        positive(problems, "plan.reserve_gib", self.reserve_gib, allow_zero=True)
        if self.hpz is not None and (
            self.hpz < 1
            or self.gpus_per_node < 1
            or self.hpz > self.gpus_per_node
            or self.gpus_per_node % self.hpz
        ):
            problems.append(
                f"plan.hpz must divide gpus_per_node ({self.gpus_per_node}) so the secondary partition "
                f"stays inside a node, got {self.hpz}"
            )
        return problems

    @property
    def world_size(self) -> int:
        """All GPUs: the ZeRO-3 partition group."""
        return self.nodes * self.gpus_per_node

    @property
    def hpz_size(self) -> int:
        """The effective hpZ partition size (1 = off)."""
        if self.hpz is not None:
            return self.hpz
        return self.gpus_per_node if self.nodes > 1 else 1


@dataclass(frozen=True, kw_only=True)
class Gather:
    """All-gather bytes received per GPU per optimizer step, and the time floor they imply."""

    global_bytes: int  # over all W ranks (crosses nodes when nodes > 1)
    node_bytes: int  # over the node-local hpZ group
    seconds: float
    first_step_extra_bytes: int = 0  # frozen params gathered globally once to build their hpZ copy


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Every figure of a plan: parameter counts, bytes per GPU, verdict."""

    model: ModelShape
    inputs: PlanInputs
    total_params: int
    base_params: int
    char_head_params: int
    trainable_params: int
    frozen_params: int
    largest_module_params: int
    backward_gathered_params: int
    params_bytes: int
    hpz_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    gather_working_bytes: int
    activation_bytes_per_sample: int  # grows with B
    activation_fixed_bytes: int  # regulariser chunk
    tail_activation_bytes: int  # at the planned micro-batch
    head_activation_bytes: int
    transient_activation_bytes: int  # one frozen no-grad layer / one layer's backward buffers
    reserve_bytes: int
    gpu_bytes: int
    gather_without_hpz: Gather
    gather_with_hpz: Gather
    reduce_scatter_bytes: int
    max_micro_batch: int
    exact_fallback_bytes: int = 0  # inference, not in the total: original MLPs + tail KV + pending inputs
    online_teacher_params: int = 0  # teacher: online: the frozen copy of the N original MLPs
    online_teacher_bytes: int = 0  # its share of `params_bytes` (+ `hpz_bytes`) per GPU
    teacher_forward_flops_per_token: int = 0  # one full teacher forward (what a shard-building pass costs)
    online_teacher_flops_per_token: int = 0  # the online teacher's extra forward work per token
    extra: dict = field(default_factory=dict)

    @property
    def model_state_bytes(self) -> int:
        """Params (+ hpZ copy) + gradients + optimizer state per GPU."""
        return self.params_bytes + self.hpz_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def activation_bytes(self) -> int:
        """Peak activations per GPU at the planned micro-batch."""
        return self.inputs.micro_batch * self.activation_bytes_per_sample + self.activation_fixed_bytes

    @property
    def total_bytes(self) -> int:
        """Everything per GPU at the planned micro-batch."""
        return self.model_state_bytes + self.gather_working_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        """True when the planned micro-batch fits in one GPU's memory."""
        return self.total_bytes <= self.gpu_bytes

    def to_dict(self) -> dict:
        """All inputs and figures as a JSON-ready dict."""
        out = {
            "model": asdict(self.model),
            "inputs": asdict(self.inputs)
            | {"world_size": self.inputs.world_size, "hpz": self.inputs.hpz_size},
        }
        for name in self.__dataclass_fields__:
            if name not in ("model", "inputs", "extra"):
                value = getattr(self, name)
                out[name] = asdict(value) if isinstance(value, Gather) else value
        out.update(
            model_state_bytes=self.model_state_bytes,
            activation_bytes=self.activation_bytes,
            total_bytes=self.total_bytes,
            fits=self.fits,
        )
        return out


def make_plan(model: ModelShape, inputs: PlanInputs) -> Plan:
    """Compute the plan's figures for one model shape and cluster (formulas in the module docstring)."""
    if inputs.trainable_layers > model.num_layers:
        raise SpellmError(
            f"plan: trainable_layers {inputs.trainable_layers} exceeds the model's {model.num_layers} layers"
        )
    d, f, n = model.hidden_size, model.intermediate_size, inputs.trainable_layers
    kvdim = model.num_kv_heads * model.head_dim
    w, hpz, a = inputs.world_size, inputs.hpz_size, inputs.grad_accum
    heads = d * inputs.k * inputs.num_chars
    total = model.base_params + heads
    trainable = heads + n * model.mlp_params
    copy = n * model.mlp_params if inputs.online else 0  # frozen, so it counts like any frozen weight
    largest = max(model.largest_module_params, heads)

    tail_per_token = BF16 * (6 * d + 2 * kvdim + 4 * f) + 2 * FP32
    head_per_token = BF16 * 2 * d + 3 * FP32 * inputs.k * inputs.num_chars
    transient_per_token = BF16 * (3 * d + 2 * kvdim + 3 * f)
    tokens = inputs.seq_len
    per_sample = tokens * (n * tail_per_token + head_per_token + transient_per_token)
    chunk = 2 * FP32 * inputs.reg_chunk_tokens * model.vocab_size

    params_bytes = math.ceil(BF16 * (total + copy) / w)
    hpz_bytes = math.ceil(BF16 * (total + copy) / hpz) if hpz > 1 else 0
    grads_bytes = math.ceil(GRAD_BYTES * trainable / w)
    optim_bytes = math.ceil(OPTIM_BYTES * trainable / w)
    bwd = n * model.layer_params + d + heads + model.vocab_size * d
    working = BF16 * (largest + model.layer_params + (bwd if inputs.tail_resident else 0))
    reserve = round(inputs.reserve_gib * GIB)
    gpu = round(inputs.gpu_mem_gib * GIB)

    per_micro = total + copy + (0 if inputs.tail_resident else bwd)
    spans_nodes = inputs.nodes > 1
    global_bw = (inputs.inter_node_gbs if spans_nodes else inputs.intra_node_gbs) * 1e9
    local_bw = inputs.intra_node_gbs * 1e9
    g_off = BF16 * a * per_micro * (w - 1) // w
    without = Gather(global_bytes=g_off, node_bytes=0, seconds=g_off / global_bw)
    hp = hpz if hpz > 1 else (inputs.gpus_per_node if inputs.gpus_per_node > 1 else 1)
    if hp > 1:
        g_glob = BF16 * trainable * (w - 1) // w
        g_node = BF16 * (a * per_micro - trainable) * (hp - 1) // hp
        with_hpz = Gather(
            global_bytes=g_glob,
            node_bytes=g_node,
            seconds=g_glob / global_bw + g_node / local_bw,
            first_step_extra_bytes=BF16 * (total + copy - trainable) * (w - 1) // w,
        )
    else:
        with_hpz = without
    fixed = params_bytes + hpz_bytes + grads_bytes + optim_bytes + working + reserve + chunk
    max_mb = max(0, (gpu - fixed) // per_sample)
    infer_tokens = inputs.micro_batch * inputs.seq_len
    exact_fallback = (
        BF16 * n * model.mlp_params + BF16 * 2 * n * kvdim * infer_tokens + BF16 * d * infer_tokens
    )
    attention = 2 * inputs.seq_len * model.num_heads * model.head_dim
    lm_head = model.vocab_size * d
    teacher_flops = 2 * (model.num_layers * model.layer_params + lm_head) + model.num_layers * attention
    return Plan(
        model=model,
        inputs=inputs,
        total_params=total,
        base_params=model.base_params,
        char_head_params=heads,
        trainable_params=trainable,
        frozen_params=total - trainable,
        largest_module_params=largest,
        backward_gathered_params=bwd,
        params_bytes=params_bytes,
        hpz_bytes=hpz_bytes,
        grads_bytes=grads_bytes,
        optimizer_bytes=optim_bytes,
        gather_working_bytes=working,
        activation_bytes_per_sample=per_sample,
        activation_fixed_bytes=chunk,
        tail_activation_bytes=inputs.micro_batch * tokens * n * tail_per_token,
        head_activation_bytes=inputs.micro_batch * tokens * head_per_token,
        transient_activation_bytes=inputs.micro_batch * tokens * transient_per_token,
        reserve_bytes=reserve,
        gpu_bytes=gpu,
        gather_without_hpz=without,
        gather_with_hpz=with_hpz,
        reduce_scatter_bytes=BF16 * a * trainable * (w - 1) // w,
        max_micro_batch=int(max_mb),
        exact_fallback_bytes=exact_fallback,
        online_teacher_params=copy,
        online_teacher_bytes=math.ceil(BF16 * copy / w) + (math.ceil(BF16 * copy / hpz) if hpz > 1 else 0),
        teacher_forward_flops_per_token=teacher_flops,
        online_teacher_flops_per_token=(2 * (n * model.layer_params + lm_head) + n * attention)
        if inputs.online
        else 0,
        extra={"hpz_for_traffic": hp},
    )
