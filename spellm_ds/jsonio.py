"""The one way the project reads and writes its small JSON files.

Reading (`read_json`) names the file in every error: missing, unreadable, not JSON, not an object, the
wrong `format` or `format_version`, or missing required keys. Writing (`write_json`, `write_text`) is
atomic and durable: a temporary file beside the target, fsync, rename, then fsync of the directory, so
a reader sees the old file or the new one and a crash never leaves half a file under the real name.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spellm_ds.errors import SpellmError


def read_json(
    path: str | os.PathLike,
    what: str = "JSON file",
    *,
    fmt: str | None = None,
    version: int | None = None,
    required: Sequence[str] = (),
    missing_hint: str | None = None,
) -> dict[str, Any]:
    """Read a JSON object from `path`; check its format/version/required keys with errors naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpellmError(missing_hint or f"{p}: {what} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpellmError(f"{p}: {what} is not readable ({exc})") from None
    return parse_json(text, str(p), what, fmt=fmt, version=version, required=required)


def read_json_or_none(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object (a cache miss)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def parse_json(
    text: str,
    where: str,
    what: str = "JSON file",
    *,
    fmt: str | None = None,
    version: int | None = None,
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """Parse a JSON object read from `where` and check it as `read_json` does."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpellmError(f"{where}: {what} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise SpellmError(f"{where}: {what} must hold a JSON object, found {type(doc).__name__}")
    if fmt is not None and doc.get("format") != fmt:
        raise SpellmError(f"{where}: not a {what} (format is {doc.get('format')!r}, expected {fmt!r})")
    if version is not None and doc.get("format_version") != version:
        raise SpellmError(f"{where}: {what} format_version {doc.get('format_version')!r}, expected {version}")
    missing = [key for key in required if key not in doc]
    if missing:
        raise SpellmError(f"{where}: {what} lacks the field(s) {', '.join(missing)}")
    return doc


def temp_path(path: str | os.PathLike) -> Path:
    """A hidden temporary name next to `path`, unique across hosts and processes."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """True for the hidden temporary names `temp_path` makes (never part of a dataset or export)."""
    return name.startswith(".") and ".tmp-" in name


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` atomically and durably (temporary file, fsync, rename, fsync dir)."""
    p = Path(path)
    tmp = temp_path(p)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)


def write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = True,
    ascii_only: bool = False,
) -> None:
    """Write `obj` as JSON to `path` atomically and durably; NaN and infinity are refused."""
    try:
        text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False, ensure_ascii=ascii_only)
    except (TypeError, ValueError) as exc:
        raise SpellmError(f"{path}: cannot be written as JSON ({exc})") from None
    write_text(path, text + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside directory `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
