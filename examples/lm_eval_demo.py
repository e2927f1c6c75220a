"""lm-evaluation-harness on the demo's held-out documents: the teacher next to the distilled export.

    python -m examples.lm_eval_demo [--out runs/demo/lm_eval] [--items N] [--docs M]

Run after `make demo` (it needs the teacher `runs/demo/smollm2/model`, its held-out documents
`runs/demo/smollm2/corpus/heldout.jsonl` and the export `runs/demo/export`). Two local tasks are built
from the held-out documents and written, JSON lines and YAML, to `<out>/tasks/`:

- `lm_eval_demo_cloze`: a LAMBADA-style cloze. Sentences of ordinary prose (no reST markup, code blocks
  or directive options; 8-40 words, the last a word of letters followed by '.'), context = the sentence
  without its last word, target = " " + that word; `loglikelihood`, metrics `acc` (the whole target is
  the greedy continuation) and `perplexity`. N items (default 100), chosen by a hash of the sentence.
- `lm_eval_demo_ppl`: rolling log-likelihood of the first M held-out documents (default 4), each cut to
  about 2,000 characters at a line end; `word_perplexity`, `byte_perplexity`, `bits_per_byte`.

Both run offline through `spellm_ds.eval.local_run.evaluate_local` (lm-eval's `simple_evaluate`) for four
settings: the teacher with lm-eval's own `hf` model, and the export with the `spellm` model with
`threshold=none` (the char path alone), `fallback=approximate,threshold=default` and
`fallback=exact,threshold=default` (the calibrated thresholds). CPU, float32. A table goes to the
terminal (for `spellm` rows, the share of scored positions on the fallback, from the model's counters),
everything to `<out>/lm_eval_demo.json`, and the last stdout line is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml

TEACHER = "runs/demo/smollm2/model"
HELDOUT = "runs/demo/smollm2/corpus/heldout.jsonl"
EXPORT = "runs/demo/export"
CLOZE_TASK = "lm_eval_demo_cloze"
PPL_TASK = "lm_eval_demo_ppl"
DOC_CHARS = 2000

SETTINGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("teacher (hf)", "hf", TEACHER, {"dtype": "float32"}),
    ("spellm char path", "spellm", EXPORT, {"dtype": "float32", "threshold": "none"}),
    (
        "spellm approximate",
        "spellm",
        EXPORT,
        {"dtype": "float32", "fallback": "approximate", "threshold": "default"},
    ),
    ("spellm exact", "spellm", EXPORT, {"dtype": "float32", "fallback": "exact", "threshold": "default"}),
]

_CODE_DIRECTIVES = {
    "code",
    "code-block",
    "sourcecode",
    "literalinclude",
    "doctest",
    "testcode",
    "testoutput",
    "testsetup",
    "productionlist",
    "highlight",
    "parsed-literal",
    "csv-table",
    "table",
    "list-table",
    "toctree",
    "raw",
    "math",
    "image",
    "figure",
}
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_BAD_CHARS = re.compile(r"[`*|<>=_\\{}\[\]#@~^$%&/]|::|\.\.|--")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]+)\.$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of ordinary prose in a reST source, joined to one line each (markup and code left out)."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_deeper: int | None = None  # inside a literal block / code directive: skip lines indented deeper
    lines = text.splitlines()

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for i, raw in enumerate(lines):
        line = raw.rstrip()
        if not line.strip():
            flush()
            continue
        ind = _indent(line)
        if skip_deeper is not None:
            if ind > skip_deeper:
                continue
            skip_deeper = None
        stripped = line.strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        directive = _DIRECTIVE.match(stripped)
        if directive:
            flush()
            if directive.group(1).split(":")[-1] in _CODE_DIRECTIVES:
                skip_deeper = ind
            continue
        if stripped.startswith("..") or _UNDERLINE.match(stripped) or (nxt and _UNDERLINE.match(nxt)):
            flush()  # comments, targets, section titles and their underlines
            continue
        if stripped.startswith((">>>", "...", ":", "|", "+", "*", "-", "#", "$", "%")) or re.match(
            r"^\d+\.\s|^#\.\s", stripped
        ):
            flush()  # prompts, field lists, tables, bullet and enumerated lists, with their indented bodies
            skip_deeper = ind
            continue
        current.append(stripped)
        if stripped.endswith("::"):
            flush()
            paragraphs.pop()  # a paragraph introducing a literal block: neither it nor the block
            skip_deeper = ind
    flush()
    return paragraphs


def cloze_candidates(text: str) -> list[dict[str, str]]:
    """LAMBADA-style items (context, target = " " + last word) from a document's prose sentences."""
    items = []
    for para in prose_paragraphs(text):
        for sentence in _SENTENCE_END.split(para):
            sentence = re.sub(r"\s+", " ", sentence).strip()
            if _BAD_CHARS.search(sentence):
                continue
            if not 8 <= len(sentence.split()) <= 40:
                continue
            m = _LAST_WORD.match(sentence)
            if m is None:
                continue
            items.append({"context": m.group(1), "target": " " + m.group(2), "sentence": sentence})
    return items


def _truncate(text: str, limit: int = DOC_CHARS) -> str:
    """The text cut to at most `limit` characters at the last line end (or space) before the limit."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    if cut < limit // 2:
        cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit].rstrip()


def build_tasks(heldout: Path, tasks_dir: Path, items: int, docs: int) -> dict[str, Any]:
    """Write the cloze and rolling-perplexity tasks (JSON lines + YAML) to `tasks_dir`; return a summary."""
    records = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines() if line.strip()]
    seen: set[str] = set()
    candidates: list[tuple[int, int, dict[str, str]]] = []
    for d, rec in enumerate(records):
        for j, item in enumerate(cloze_candidates(rec["text"])):
            if item["sentence"] in seen:
                continue
            seen.add(item["sentence"])
            candidates.append((d, j, {**item, "doc": rec["doc"]}))
    chosen = sorted(candidates, key=lambda c: hashlib.sha1(c[2]["sentence"].encode()).hexdigest())[:items]
    chosen.sort(key=lambda c: (c[0], c[1]))  # document order
    cloze = [c[2] for c in chosen]
    ppl = [{"doc": rec["doc"], "text": _truncate(rec["text"])} for rec in records[:docs]]
    tasks_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(tasks_dir / "cloze.jsonl", cloze)
    _write_jsonl(tasks_dir / "ppl.jsonl", ppl)
    cloze_cfg = {
        "task": CLOZE_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "cloze.jsonl"}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0},
    }
    ppl_cfg = {
        "task": PPL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "ppl.jsonl"}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        "metadata": {"version": 1.0},
    }
    for name, cfg in ((CLOZE_TASK, cloze_cfg), (PPL_TASK, ppl_cfg)):
        (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return {
        "cloze_candidates": len(candidates),
        "cloze_items": len(cloze),
        "ppl_docs": [r["doc"] for r in ppl],
        "ppl_chars": sum(len(r["text"]) for r in ppl),
    }


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    """The table's figures from one `evaluate_local` result."""
    res = results["results"]
    cloze, ppl = res[CLOZE_TASK], res[PPL_TASK]
    out: dict[str, Any] = {
        "cloze_acc": cloze["acc,none"],
        "cloze_perplexity": cloze["perplexity,none"],
        "word_perplexity": ppl["word_perplexity,none"],
        "byte_perplexity": ppl["byte_perplexity,none"],
        "bits_per_byte": ppl["bits_per_byte,none"],
    }
    sp = results.get("spellm")
    if sp:
        counts = sp["counters"]
        kinds = ("loglikelihood", "loglikelihood_rolling")
        positions = sum(counts[k]["positions"] for k in kinds)
        out.update(
            fallback=sp["fallback"],
            threshold=sp["threshold"],
            fallback_share=sum(counts[k]["fallback"] for k in kinds) / max(1, positions),
            fallback_share_cloze=sp["rates"]["loglikelihood"]["fallback"],
            fallback_share_ppl=sp["rates"]["loglikelihood_rolling"]["fallback"],
            positions=positions,
            counters={k: counts[k] for k in kinds},
        )
    return out


def _num(value: float, width: int) -> str:
    """A figure right-aligned in `width` characters: fixed point, or scientific when it is huge."""
    return f"{value:>{width}.2f}" if abs(value) < 1e6 else f"{value:>{width}.2e}"


def _table(rows: dict[str, dict[str, Any]]) -> str:
    """The figures as a fixed-width table, one row per setting."""
    head = (
        f"{'setting':<20} {'cloze acc':>9} {'cloze ppl':>10} {'word ppl':>10} {'bits/byte':>9} "
        f"{'fallback':>9}"
    )
    lines = [head, "-" * len(head)]
    for name, f in rows.items():
        fb = f"{100 * f['fallback_share']:.1f}%" if "fallback_share" in f else "-"
        lines.append(
            f"{name:<20} {f['cloze_acc']:>9.3f} {_num(f['cloze_perplexity'], 10)} "
            f"{_num(f['word_perplexity'], 10)} {f['bits_per_byte']:>9.3f} {fb:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the tasks, evaluate the four settings, print the table and the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo/lm_eval", help="output directory")
    ap.add_argument("--items", type=int, default=100, help="cloze items (default 100)")
    ap.add_argument("--docs", type=int, default=4, help="held-out documents for rolling perplexity")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--heldout", default=HELDOUT)
    ap.add_argument("--teacher", default=TEACHER)
    ap.add_argument("--export", default=EXPORT)
    args = ap.parse_args(argv)

    import spellm_ds.eval.local_run as lem  # registers `spellm` with lm-eval (spellm_ds.eval.harness)

    out = Path(args.out)
    tasks_dir = out / "tasks"
    summary = build_tasks(Path(args.heldout), tasks_dir, args.items, args.docs)
    print(
        f"tasks: {summary['cloze_items']} cloze items (of {summary['cloze_candidates']} candidates), "
        f"{len(summary['ppl_docs'])} documents ({summary['ppl_chars']} chars) -> {tasks_dir}",
        file=sys.stderr,
    )
    rows: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for name, model, _, model_args in SETTINGS:
        model_dir = args.teacher if model == "hf" else args.export
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress notes on stdout
            results = lem.evaluate_local(
                model_dir,
                tasks_dir,
                [CLOZE_TASK, PPL_TASK],
                model=model,
                model_args=dict(model_args),
                batch_size=args.batch_size,
                device="cpu",
            )
        timings[name] = round(time.perf_counter() - t0, 1)
        rows[name] = _figures(results)
        print(f"{name}: {timings[name]:.1f}s", file=sys.stderr)
    report = {
        "tasks": summary,
        "settings": {name: {"model": m, "model_args": a} for name, m, _, a in SETTINGS},
        "figures": rows,
        "wall_s": {**timings, "total": round(time.perf_counter() - start, 1)},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval_demo.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(_table(rows))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
