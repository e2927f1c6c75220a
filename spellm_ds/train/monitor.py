"""What a training run reports: progress lines, TensorBoard scalars and hparams, decoded text samples.

The trainer (`spellm_ds.train.loop`) decides when; this module owns how: the collective mean over ranks, the
memory figures, the TensorBoard writer (rank 0, purging events a crashed run logged past its checkpoint)
and the markdown table of student vs teacher tokens written under `eval/samples`.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import torch


def memory_mb(device: torch.device) -> dict[str, float]:
    """Peak and current memory of this process: CUDA allocator figures on GPU, RSS on CPU (MiB)."""
    if device.type == "cuda":
        return {
            "memory/cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "memory/cuda_allocated_mb": torch.cuda.memory_allocated(device) / 2**20,
        }
    out = {"memory/max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out["memory/rss_mb"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return out


def mean_over_ranks(values: dict[str, float], device: torch.device, world_size: int) -> dict[str, float]:
    """Collective: the mean of each named value over all ranks."""
    import torch.distributed as dist

    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {n: float(v) / world_size for n, v in zip(names, t.tolist())}


def open_writer(tb_dir: Path, step: int) -> Any:
    """A TensorBoard writer for `tb_dir`; at a resume (step > 0) events after `step` are purged."""
    from torch.utils.tensorboard import SummaryWriter

    tb_dir.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(tb_dir), purge_step=step + 1 if step else None)


def write_header(writer: Any, config_yaml: str, flat: dict[str, Any], step: int) -> None:
    """Write the resolved config as text and as TensorBoard hparams."""
    from torch.utils.tensorboard.summary import hparams

    writer.add_text("config", "```yaml\n" + config_yaml + "\n```", global_step=step)
    hp = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
    exp, ssi, sei = hparams(hp, {"train/loss": float("nan"), "eval/loss": float("nan")})
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    writer.flush()


def write_scalars(writer: Any, scalars: dict[str, float], step: int) -> None:
    """Add every scalar at `step` and flush."""
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
    writer.flush()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (None as "null")."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if v is not None else "null"
    return out


def text_samples(
    batch: dict[str, torch.Tensor],
    char_logits: torch.Tensor,
    *,
    lookup: Any,
    tokenizer: Any,
    charset: Any,
    count: int,
    positions: int = 32,
) -> str:
    """Markdown: per position, the input token, the teacher's top-1 next token and the student's decode."""
    chars = char_logits.argmax(-1)  # [B, T, k]
    ids = lookup.lookup(chars)  # [B, T], -1 when the spelled string is no token
    tok = tokenizer
    cs = charset
    parts = []
    for b in range(min(count, chars.shape[0])):
        if int(batch["sample_index"][b]) < 0:
            continue
        n = min(positions, chars.shape[1])
        context = tok.decode(batch["input_ids"][b, :n].tolist())
        rows = ["| t | input | teacher top-1 | student | match |", "|---|---|---|---|---|"]
        hits = 0
        for t in range(n):
            teacher = int(batch["topk_ids"][b, t, 0])
            student = int(ids[b, t])
            shown = tok.decode([student]) if student >= 0 else "⟨" + cs.decode(chars[b, t].tolist()) + "⟩"
            hit = student == teacher
            hits += hit
            given = tok.decode([int(batch["input_ids"][b, t])])
            rows.append(
                f"| {t} | `{_md(given)}` | `{_md(tok.decode([teacher]))}` | `{_md(shown)}` "
                f"| {'✓' if hit else '✗'} |"
            )
        parts.append(
            f"**sample {int(batch['sample_index'][b])}** "
            f"({hits}/{n} equal to teacher top-1; ⟨⟩ = spelled string that is no token)\n\n"
            f"text: `{_md(context)}`\n\n" + "\n".join(rows)
        )
    return "\n\n".join(parts)


def _md(text: str) -> str:
    """Escape a token for a markdown table cell."""
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")
