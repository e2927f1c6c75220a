"""Where benchmark figures live: `--save` writes a bench's final JSON under `bench/results/`.

Every benchmark in this folder ends by printing one JSON object. With `--save` (or `--save NAME`) it also
writes that object to `bench/results/NAME.json`, wrapped with what is needed to reproduce and judge it: the
command line, the machine (CPU model, cores, memory, accelerator, library versions) and the date. NAME
defaults to the benchmark's own name; give another one when a flag changes what is measured
(`decode.py --full-model --save decode-full-model`).

`python bench/record.py` renders every saved result into `docs/RESULTS.md`, the one page that quotes
figures; README, DESIGN, `examples/README.md` and config comments name a result's key there
(`decode-full-model: speedup_fallback_exact`) instead of restating its number. A test checks that the
page matches the files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
RESULTS_PAGE = REPO / "docs" / "RESULTS.md"
FORMAT = "spellm-ds-bench-result/1"


def add_save_flag(parser: argparse.ArgumentParser, default_name: str) -> None:
    """Add `--save [NAME]` to a benchmark's parser (NAME defaults to `default_name`)."""
    parser.add_argument(
        "--save",
        nargs="?",
        const=default_name,
        default=None,
        metavar="NAME",
        help=f"also write the final JSON to bench/results/NAME.json (default NAME: {default_name})",
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, accelerator and library versions."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["accelerator"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        info["accelerator"] = "unknown"
    for name in ("transformers", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            continue
    return info


def command_line(argv: list[str] | None = None) -> str:
    """The command that reproduces a run, relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else Path("?")
    try:
        shown = str(script.relative_to(REPO))
    except ValueError:
        shown = script.name
    return " ".join(["python", shown, *argv[1:]])


def repo_relative(path: str | os.PathLike) -> str:
    """`path` relative to the repository when inside it (results carry no machine-specific roots)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def alternating(names: list[str], rounds: int) -> list[tuple[str, int]]:
    """(side, round) in measuring order: the sides forward, then reversed, alternately (ABBA...)."""
    order: list[tuple[str, int]] = []
    for r in range(rounds):
        order.extend((name, r) for name in (names if r % 2 == 0 else names[::-1]))
    return order


def save(
    name: str | None,
    figures: dict[str, Any],
    argv: list[str] | None = None,
    note: str | None = None,
    command: str | None = None,
) -> Path | None:
    """Write `figures` to bench/results/NAME.json with the command and machine; None when not asked."""
    if not name:
        return None
    if not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--save {name!r}: use letters, digits, '-' and '_' only")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {
        "format": FORMAT,
        "name": name,
        "command": command or command_line(argv),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "figures": figures,
    }
    if note:
        record["note"] = note
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"saved {repo_relative(path)}", file=sys.stderr)
    return path


def load_all(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every saved result, sorted by name; a file that is not a result is an error naming it."""
    out = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not JSON ({e})") from None
        missing = [k for k in ("format", "name", "command", "date", "machine", "figures") if k not in record]
        if missing or record.get("format") != FORMAT:
            raise SystemExit(f"{path}: not a {FORMAT} record (missing {missing or ['format']})")
        if record["name"] != path.stem:
            raise SystemExit(f"{path}: its name field {record['name']!r} differs from the file name")
        out.append(record)
    return out


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        rows: list[tuple[str, Any]] = []
        for k, v in value.items():
            rows.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return rows
    return [(prefix, value)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value).replace("|", "\\|")


def _machine_line(m: dict[str, Any]) -> str:
    parts = [f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB"]
    if m.get("accelerator") not in (None, "none"):
        parts.append(str(m["accelerator"]))
    parts.extend(f"{k} {m[k]}" for k in ("python", "torch", "transformers", "deepspeed") if k in m)
    return "; ".join(parts)


def render(records: list[dict[str, Any]]) -> str:
    """The text of docs/RESULTS.md for these records."""
    lines = [
        "# Measured results",
        "",
        "<!-- Generated by `python bench/record.py` from bench/results/*.json; do not edit by hand. -->",
        "",
        "Every figure this project quotes lives here, one section per saved run. Other documents name a",
        "figure by its result and key (`online: online_over_offline_wall_median`) and link here. To add",
        "or refresh one, rerun the command shown with `--save`, then `python bench/record.py` to rewrite",
        "this page.",
        "Timings are side by side within one run on a machine shared with other work; compare ratios, not",
        "seconds across runs.",
        "",
    ]
    if records:
        lines += ["| result | date | what it measures |", "| --- | --- | --- |"]
        for r in records:
            what = (
                str(r["figures"].get("what", "")).replace("|", "\\|")
                if isinstance(r["figures"], dict)
                else ""
            )
            lines.append(f"| [{r['name']}](#{r['name']}) | {r['date']} | {what} |")
        lines.append("")
    for r in records:
        lines += [
            f"## {r['name']}",
            "",
            f"Command: `{r['command']}`",
            "",
            f"Machine: {_machine_line(r['machine'])}. Date: {r['date']}.",
            "",
        ]
        if r.get("note"):
            lines += [str(r["note"]), ""]
        lines += ["| key | value |", "| --- | --- |"]
        lines += [f"| `{k}` | {_cell(v)} |" for k, v in _flatten(r["figures"]) if k != "what"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/RESULTS.md from bench/results/ (or check it is current with --check)."""
    ap = argparse.ArgumentParser(description="Render bench/results/*.json into docs/RESULTS.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/RESULTS.md is out of date")
    args = ap.parse_args(argv)
    text = render(load_all())
    if args.check:
        current = RESULTS_PAGE.read_text(encoding="utf-8") if RESULTS_PAGE.exists() else ""
        if current != text:
            print(f"{RESULTS_PAGE.relative_to(REPO)} is out of date: run python bench/record.py")
            return 1
        return 0
    RESULTS_PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {repo_relative(RESULTS_PAGE)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
