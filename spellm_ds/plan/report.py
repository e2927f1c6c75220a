"""The plan as an aligned text report (`spellm-ds plan` without `--json`)."""

from __future__ import annotations

from spellm_ds.plan.estimate import GIB, Plan


def _gib(n: int | float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _row(label: str, nbytes: int) -> str:
    return f"  {label:<28}{_gib(nbytes)}"


def _count(n: int) -> str:
    return f"{n:>15,} ({n / 1e9:6.2f} B)"


def format_plan(plan: Plan) -> str:
    """Render a plan as an aligned text report."""
    m, i = plan.model, plan.inputs
    hpz = i.hpz_size
    lines = [
        f"model      {m.arch}: d={m.hidden_size} ffn={m.intermediate_size} layers={m.num_layers} "
        f"heads={m.num_heads}/{m.num_kv_heads}kv vocab={m.vocab_size} tied={str(m.tied_embeddings).lower()}",
        f"cluster    {i.nodes} node(s) x {i.gpus_per_node} GPU(s) = {i.world_size} GPUs, "
        f"{i.gpu_mem_gib:g} GiB each, hpZ partition {hpz if hpz > 1 else 'off'}",
        f"run        seq {i.seq_len}, micro-batch {i.micro_batch}, grad-accum {i.grad_accum}, "
        f"trainable layers {i.trainable_layers}, k={i.k} x |C|={i.num_chars}",
        "",
        "parameters",
        f"  total (base + char heads)   {_count(plan.total_params)}",
        f"  base model                  {_count(plan.base_params)}",
        f"  char heads                  {_count(plan.char_head_params)}",
        f"  trainable                   {_count(plan.trainable_params)}",
        f"  frozen                      {_count(plan.frozen_params)}",
        f"  largest module              {_count(plan.largest_module_params)}",
        "",
        "memory per GPU",
        f"  params bf16 /{i.world_size:<4}           {_gib(plan.params_bytes)}",
        f"  hpZ secondary copy /{hpz:<4}    {_gib(plan.hpz_bytes)}",
        f"  gradients (trainable)       {_gib(plan.grads_bytes)}",
        f"  optimizer (trainable)       {_gib(plan.optimizer_bytes)}",
        f"  gather working set          {_gib(plan.gather_working_bytes)}",
        f"  activations, tail w/ grad   {_gib(plan.tail_activation_bytes)}",
        f"  activations, heads          {_gib(plan.head_activation_bytes)}",
        f"  activations, one layer      {_gib(plan.transient_activation_bytes)}   (no-grad / backward)",
        f"  regulariser chunk           {_gib(plan.activation_fixed_bytes)}",
        f"  reserve                     {_gib(plan.reserve_bytes)}",
        f"  total                       {_gib(plan.total_bytes)} of {_gib(plan.gpu_bytes).strip()}",
        f"  exact fallback, inference   {_gib(plan.exact_fallback_bytes)}   (not in total: "
        f"{i.trainable_layers} original MLPs + KV, {i.micro_batch} x {i.seq_len} tokens)",
        "",
        "all-gather per GPU per optimizer step (bytes received)",
        _row(f"without hpZ: {i.world_size} GPUs", plan.gather_without_hpz.global_bytes)
        + f"   (>= {plan.gather_without_hpz.seconds:.2f} s)",
    ]
    wh = plan.gather_with_hpz
    if wh is plan.gather_without_hpz:
        lines.append("  with hpZ: not applicable (1 GPU per node)")
    else:
        hp = plan.extra["hpz_for_traffic"]
        lines += [
            _row(f"with hpZ {hp}: {i.world_size} GPUs", wh.global_bytes) + "   (trainable, after every step)",
            _row(f"  + inside the node ({hp} GPUs)", wh.node_bytes) + f"   (>= {wh.seconds:.2f} s in all)",
            _row("  + first step only", wh.first_step_extra_bytes) + f"   (frozen, {i.world_size} GPUs)",
        ]
    lines += [_row("gradient reduce-scatter", plan.reduce_scatter_bytes) + f"   ({i.world_size} GPUs)"]
    if i.online:
        share = plan.online_teacher_flops_per_token / max(1, plan.teacher_forward_flops_per_token)
        lines += [
            "",
            "online teacher (teacher: online)",
            f"  original MLP copies         {_count(plan.online_teacher_params)}   "
            f"({i.trainable_layers} MLPs, frozen)",
            _row("their memory per GPU", plan.online_teacher_bytes) + "   (included in params / hpZ above)",
            f"  teacher FLOPs per token     {plan.online_teacher_flops_per_token / 1e9:10.2f} GFLOP   "
            f"({100 * share:.1f}% of a full teacher forward, "
            f"{plan.teacher_forward_flops_per_token / 1e9:.2f} GFLOP, at seq {i.seq_len})",
            "  offline instead: one teacher forward per token to build shards, then none in training",
        ]
    lines += [
        "",
        f"verdict    {'FITS' if plan.fits else 'DOES NOT FIT'} at micro-batch {i.micro_batch}; "
        f"largest micro-batch that fits: {plan.max_micro_batch}",
    ]
    return "\n".join(lines)
