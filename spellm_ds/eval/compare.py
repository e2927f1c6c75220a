"""Generation side by side: a SpeLLM export's greedy continuations against its teacher's.

Prompts are token-id prefixes of held-out shard samples (sample i's first `prompt_tokens` ids, so both
models read exactly the same ids), plus optional text prompts shown in full. When the export's threshold
was calibrated on these shards, the samples that chose it are left out, so the `with_fallback` figures
come from samples the threshold never saw (`prompt_samples` says which were used). The teacher generates with
plain transformers `generate` (greedy, KV cache); the student with `SpeLLMForCausalLM.generate`, once per
fallback setting: `no_fallback` (char path + AutoCorrect only) and `with_fallback` (the export's threshold,
as calibrated). Both stop at the generation config's end tokens; a continuation is compared up to and
including its first end token.

Per setting, over the shard prompts:
- `agreement_tokens_mean`: mean number of leading new tokens equal to the teacher's (the agreement before
  the first divergence); `agreement_share`: their sum over the sum of the student's new tokens, i.e. the
  share of generated tokens produced before the first divergence;
- `full_match`: share of prompts whose whole continuation equals the teacher's;
- the decode-path counters (exact, AutoCorrect, fallback) of those generations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spellm_ds.errors import SpellmError
from spellm_ds.inference.batching import eos_ids, left_pad


def cut_at_end(tokens: list[int], end_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first end token."""
    for i, t in enumerate(tokens):
        if t in end_ids:
            return tokens[: i + 1]
    return tokens


def leading_agreement(student: list[int], teacher: list[int]) -> int:
    """Number of leading positions where the two token lists agree."""
    n = 0
    for a, b in zip(student, teacher):
        if a != b:
            break
        n += 1
    return n


def agreement_summary(students: list[list[int]], teachers: list[list[int]]) -> dict[str, float]:
    """Agreement before the first divergence over paired continuations (see the module docstring)."""
    if len(students) != len(teachers) or not students:
        raise SpellmError(
            f"need equally many non-zero continuations, got {len(students)} and {len(teachers)}"
        )
    agree = [leading_agreement(s, t) for s, t in zip(students, teachers)]
    generated = sum(len(s) for s in students)
    return {
        "prompts": float(len(students)),
        "agreement_tokens_mean": float(np.mean(agree)),
        "agreement_share": sum(agree) / max(1, generated),
        "full_match": float(np.mean([s == t for s, t in zip(students, teachers)])),
    }


def teacher_greedy(
    model: Any, prompts: list[list[int]], new_tokens: int, pad: int, batch: int
) -> list[list[int]]:
    """Greedy continuations (new token ids) of id prompts by a plain HF causal LM, left-padded batches."""
    out: list[list[int]] = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids, mask = left_pad(prompts[i : i + batch], pad)
            seq = model.generate(
                ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            out += [row[ids.shape[1] :].tolist() for row in seq.cpu()]
    return out


def student_greedy(
    model: Any, prompts: list[list[int]], new_tokens: int, pad: int, batch: int, threshold: float | None
) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy continuations by a SpeLLM model at one fallback threshold, and the summed path counters."""
    out: list[list[int]] = []
    counters: dict[str, int] = {}
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids, mask = left_pad(prompts[i : i + batch], pad)
            res = model.generate(ids, mask, max_new_tokens=new_tokens, threshold=threshold, pad_token_id=pad)
            new = res.sequences[:, ids.shape[1] :].cpu()
            paths = res.paths.cpu()
            out += [new[r][paths[r] >= 0].tolist() for r in range(new.shape[0])]
            for key, val in res.counters.items():
                counters[key] = counters.get(key, 0) + int(val)
    return out, counters


def shard_prompts(
    shards: str | os.PathLike, count: int, prompt_tokens: int, skip: np.ndarray | None = None
) -> list[list[int]]:
    """The first `prompt_tokens` ids of the first `count` samples of a shard dataset, less `skip`'s.

    `skip` (a boolean per sample in shard order) leaves out the samples that chose the threshold."""
    from spellm_ds.data.shards import iter_shard, read_index

    location = Path(shards)
    index = read_index(location)
    prompts: list[list[int]] = []
    seen = 0
    for entry in index["shards"]:
        for sample in iter_shard(location / entry["name"]):
            skipped = skip is not None and seen < len(skip) and bool(skip[seen])
            seen += 1
            if skipped:
                continue
            prompts.append([int(t) for t in np.asarray(sample["input_ids"])[:prompt_tokens]])
            if len(prompts) == count:
                return prompts
    left_out = "" if skip is None else f" outside the {int(np.sum(skip))} that calibrated the threshold"
    raise SpellmError(
        f"{location}: {len(prompts)} samples{left_out}, fewer than the {count} prompts asked for"
    )


def calibration_skip(spellm_config: dict[str, Any], shards: str | os.PathLike) -> np.ndarray | None:
    """The samples of `shards` that chose the export's threshold (None when it was calibrated elsewhere)."""
    from spellm_ds.eval.metrics import calibration_samples

    cal = spellm_config.get("calibration") or {}
    if "calibration_fraction" not in cal or not cal.get("shards"):
        return None
    if Path(cal["shards"]).resolve() != Path(shards).resolve():
        return None
    return calibration_samples(int(cal["samples"]), float(cal["calibration_fraction"]))


def compare_generation(
    model_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    *,
    shards: str | os.PathLike | None = None,
    prompts: int = 64,
    prompt_tokens: int = 48,
    new_tokens: int = 32,
    texts: list[str] | None = None,
    text_tokens: int = 48,
    batch_size: int = 16,
    device: str = "cpu",
    base_model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Teacher vs student greedy generation: agreement over shard prompts and the texts side by side."""
    from transformers import AutoModelForCausalLM

    from spellm_ds.inference.model import SpeLLMForCausalLM

    student = SpeLLMForCausalLM.from_pretrained(model_dir, base_model=base_model, device=device)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).to(device).eval()
    tok = student.tokenizer
    gen = teacher.generation_config
    end_ids = set(eos_ids(teacher))
    pad = gen.pad_token_id if gen.pad_token_id is not None else (min(end_ids) if end_ids else 0)
    settings = {"no_fallback": None, "with_fallback": student.threshold}
    result: dict[str, Any] = {"threshold": student.threshold, "new_tokens": new_tokens, "settings": {}}
    if shards is not None:
        skip = calibration_skip(student.spellm_config, shards)
        ids = shard_prompts(shards, prompts, prompt_tokens, skip)
        result["prompt_samples"] = (
            "report part (the calibration samples left out)" if skip is not None else "all"
        )
        ref = [cut_at_end(t, end_ids) for t in teacher_greedy(teacher, ids, new_tokens, pad, batch_size)]
        for name, threshold in settings.items():
            got, counters = student_greedy(student, ids, new_tokens, pad, batch_size, threshold)
            summary = agreement_summary([cut_at_end(s, end_ids) for s in got], ref)
            result["settings"][name] = {**summary, "counters": counters}
        result["prompt_tokens"] = prompt_tokens
    samples = []
    for text in texts or []:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        row = {"prompt": text, "teacher": tok.decode(teacher_greedy(teacher, [ids], text_tokens, pad, 1)[0])}
        for name, threshold in settings.items():
            got, _ = student_greedy(student, [ids], text_tokens, pad, 1, threshold)
            row[name] = tok.decode(got[0])
        samples.append(row)
    result["samples"] = samples
    return result
