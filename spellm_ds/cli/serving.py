"""Subcommands that write and use an export directory: export, generate."""

from __future__ import annotations

import argparse

from spellm_ds.cli.args import add_device_option, add_export_options
from spellm_ds.dist import default_device
from spellm_ds.dtypes import TORCH_DTYPES


# --- export ---
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="ZeRO-3 checkpoint -> inference directory (HF safetensors + char heads + charset)",
        description="Write an inference directory from a DeepSpeed ZeRO-3 checkpoint of any world size, one "
        "tensor at a time. Runs alone or under torchrun/srun/mpirun (ranks split the output shards).",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint root or tag dir")
    p.add_argument("--output", required=True, metavar="DIR", help="export directory")
    p.add_argument("--delta", action="store_true", help="only char heads + trained MLPs")
    p.add_argument("--tag", default=None, help="checkpoint tag inside --checkpoint (default: `latest`)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *TORCH_DTYPES],
        help="tensor dtype (default auto: the training dtype)",
    )
    p.add_argument("--base-model", default=None, metavar="DIR", help="base model dir (default: recorded one)")
    p.add_argument("--threshold", type=float, default=None, help="fallback threshold (default 0.22)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5 GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --output")
    p.add_argument(
        "--no-original-mlps",
        action="store_true",
        help="do not carry the trained MLPs' original weights (smaller; loads with the approximate fallback)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code to run")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from spellm_ds.export.write import export_checkpoint

    s = export_checkpoint(
        args.checkpoint,
        args.output,
        delta=args.delta,
        tag=args.tag,
        dtype=args.dtype,
        base_model=args.base_model,
        threshold=args.threshold,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        original_mlps=not args.no_original_mlps,
    )
    kind = "delta" if s.delta else "full"
    print(
        f"exported {kind} model of step {s.step} to {s.output}: {s.tensors} tensors, {s.bytes / 1e6:.1f} MB "
        f"{s.dtype}, trained layers {s.trained_layers}"
    )
    return 0


# --- generate ---
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a SpeLLM export (char heads, AutoCorrect, entropy fallback)",
        description="Generate from one or more prompts and print the text and the decode-path counters.",
    )
    add_export_options(p, remote_code=True)
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threshold", type=float, default=None, help="fallback threshold (default: the export's)")
    p.add_argument("--no-fallback", action="store_true", help="never fall back to the original model")
    p.add_argument(
        "--fallback",
        default=None,
        choices=["exact", "approximate"],
        help="exact: the original model's prediction; approximate: the original lm_head on the student's "
        "hidden state (default: exact where the export holds the original MLPs)",
    )
    p.add_argument("--no-autocorrect", action="store_true", help="fall back instead of AutoCorrect on misses")
    add_device_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import json

    import torch

    from spellm_ds.inference.model import SpeLLMForCausalLM

    device = default_device(args.device)
    model = SpeLLMForCausalLM.from_pretrained(
        args.model,
        base_model=args.base_model,
        device=device,
        fallback=args.fallback,
        trust_remote_code=args.trust_remote_code,
    )
    threshold = None if args.no_fallback else (model.threshold if args.threshold is None else args.threshold)
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
    texts, out = model.generate_text(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        threshold=threshold,
        autocorrect=not args.no_autocorrect,
        generator=gen,
    )
    if args.json:
        print(
            json.dumps(
                {"texts": texts, "counters": out.counters, "threshold": threshold, "fallback": model.fallback}
            )
        )
        return 0
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")
        print("---")
    c, rates = out.counters, out.rates()
    print(
        f"tokens {c['tokens']}: exact {c['exact']} ({100 * rates['exact']:.1f}%), autocorrect "
        f"{c['autocorrect']} ({100 * rates['autocorrect']:.1f}%), fallback {c['fallback']} "
        f"({100 * rates['fallback']:.1f}% {model.fallback}), threshold {threshold}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub`."""
    _add_export(sub)
    _add_generate(sub)
