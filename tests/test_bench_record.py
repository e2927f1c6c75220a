"""Where measured figures live (`bench/record.py`): a saved record's fields, the page rendered from the
records, and that the shipped docs/RESULTS.md is the rendering of the shipped bench/results/*.json.

Run alone: `.venv/bin/python -m pytest tests/test_bench_record.py -q`
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("bench_record", REPO / "bench" / "record.py")
record = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(record)


def test_save_writes_the_command_machine_and_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path)
    argv = [str(REPO / "bench" / "decode.py"), "--full-model", "--save", "decode-full"]
    path = record.save("decode-full", {"what": "a test", "speedup": 1.25}, argv, note="a note")
    saved = json.loads(path.read_text())
    assert path == tmp_path / "decode-full.json"
    assert saved["command"] == "python bench/decode.py --full-model --save decode-full"
    assert saved["figures"] == {"what": "a test", "speedup": 1.25} and saved["note"] == "a note"
    assert saved["machine"]["cores"] >= 1 and "cpu" in saved["machine"]
    assert record.save(None, {"x": 1}) is None  # --save not given: nothing written
    with pytest.raises(SystemExit, match="letters, digits"):
        record.save("../escape", {"x": 1}, argv)


def test_render_shows_each_record_with_its_keys(tmp_path):
    rec = {
        "format": record.FORMAT,
        "name": "online",
        "command": "python bench/online.py --save",
        "date": "2026-12-07",
        "machine": {"cpu": "Some CPU", "cores": 2, "memory_gib": 23.4, "torch": "2.13.0"},
        "figures": {"what": "offline vs online", "ratio": 0.6666666, "modes": {"offline": {"min_s": 12.5}}},
    }
    (tmp_path / "online.json").write_text(json.dumps(rec))
    page = record.render(record.load_all(tmp_path))
    assert "| [online](#online) | 2026-12-07 | offline vs online |" in page
    assert "Command: `python bench/online.py --save`" in page
    assert "| `ratio` | 0.6667 |" in page and "| `modes.offline.min_s` | 12.5 |" in page
    assert "Some CPU, 2 cores, 23.4 GiB" in page
    (tmp_path / "bad.json").write_text(json.dumps({**rec, "name": "other"}))
    with pytest.raises(SystemExit, match=r"bad\.json"):
        record.load_all(tmp_path)


def test_shipped_results_page_is_the_rendering_of_the_shipped_records():
    records = record.load_all()
    assert records, "bench/results holds no saved result"
    assert (REPO / "docs" / "RESULTS.md").read_text(encoding="utf-8") == record.render(records), (
        "docs/RESULTS.md is out of date: run python bench/record.py"
    )


def test_sides_alternate_forward_then_reversed():
    assert record.alternating(["a", "b"], 3) == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert record.alternating(["a", "b", "c"], 0) == []
    assert record.repo_relative(REPO / "bench" / "x.py") == "bench/x.py"
    assert record.repo_relative("/elsewhere/y") == "/elsewhere/y"
