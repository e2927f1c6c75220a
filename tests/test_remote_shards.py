"""Remote shard reads (spellm_ds/data/remote.py): dropped connections, stalls and failing commands are
retried.

A threaded stdlib HTTP server on 127.0.0.1 serves a synthetic shard set (test_data's `build_dataset`,
6 shards x 5 samples) and misbehaves on purpose: each file has a fixed, finite list of faults that its
next requests play in order (answer 503, send part of the body and hang up, send part and go silent
past the loader's read timeout), after which it serves the file properly. `pipe:` locations run a small
shell script that fails or stalls on its first runs the same way. The reference for "every sample
exactly once, none skipped" is the same loader reading the local directory. Timeouts and backoffs are
a fraction of a second, so the whole file runs in seconds. Run alone:
`.venv/bin/python -m pytest tests/test_remote_shards.py -q`
"""

from __future__ import annotations

import http.server
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from spellm_ds.data.remote import ShardReadError
from spellm_ds.data.shards import shard_name
from spellm_ds.errors import ShardError
from tests.test_data import TOTAL, build_dataset, flat, indices, loader

# index.json is fetched with webdataset's curl pipe; only the shards go through the retrying reader.
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl for index.json")

FAST = {"read_retries": 3, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05, "read_timeout_s": 0.5}
STALL_S = 3.0  # a stalled answer stays silent this long (far past read_timeout_s)

# What the successive requests of a shard do before it is served properly: ("error",), a 503;
# ("drop", f), send fraction f of the body, then close; ("stall", f), send fraction f, then go silent;
# ("stall-head",), go silent before the status line. With ranges, f is of the requested rest.
# Shards are 10240 bytes: 5 members of 1024 bytes, the end-of-archive marker, then zero padding.
SCHEDULE = {
    0: [("drop", 0.5)],  # all members, but not the end-of-archive marker
    1: [("stall", 0.31)],  # mid-header
    2: [("error",), ("drop", 0.26), ("drop", 0.71)],  # mid-payload, then in the padding
    3: [("drop", 0.0)],  # headers only
    5: [("stall-head",), ("drop", 0.93)],
}


class FaultyServer:
    """Serves a directory over HTTP/1.0 on 127.0.0.1, playing each file's scheduled faults first."""

    def __init__(self, root: Path, ranges: bool = True) -> None:
        self.root, self.ranges = root, ranges
        self.faults: dict[str, list[tuple]] = {}
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.partial = 0  # 206 answers sent
        self.lock = threading.Lock()
        self.stop = threading.Event()
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                """Answer through the server's fault schedule."""
                state.answer(self)

            def log_message(self, *args) -> None:
                """Keep the test output quiet."""

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients hang up on purpose
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def schedule(self, faults: dict[int, list[tuple]]) -> None:
        """Give shards (by index) their fault lists."""
        with self.lock:
            self.faults.update({shard_name(i): list(f) for i, f in faults.items()})

    def pending(self) -> dict[str, list[tuple]]:
        """Faults not played yet."""
        with self.lock:
            return {k: v for k, v in self.faults.items() if v}

    def count(self, name: str) -> int:
        """Requests received for one file."""
        with self.lock:
            return sum(1 for n, _ in self.requests if n == name)

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        """Answer one GET: the file's next scheduled fault, else the file (from a Range start if asked)."""
        name = Path(h.path).name  # the dataset's files have distinct names
        with self.lock:
            self.requests.append((name, h.headers.get("Range")))
            queue = self.faults.get(name)
            fault = queue.pop(0) if queue else ("ok",)
        path = (self.root / h.path.lstrip("/")).resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            h.send_error(404)
            return
        if fault[0] == "error":
            h.send_error(503)
            return
        if fault[0] == "stall-head":
            self.stop.wait(STALL_S)
            return
        data = path.read_bytes()
        got = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "") if self.ranges else None
        start = int(got.group(1)) if got else 0
        body = data[start:]
        h.send_response(206 if start else 200)
        with self.lock:
            self.partial += bool(start)
        if self.ranges:
            h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if fault[0] in ("drop", "stall"):
            h.wfile.write(body[: int(len(body) * fault[1])])
            h.wfile.flush()
            if fault[0] == "stall":
                self.stop.wait(STALL_S)
            return  # HTTP/1.0: the connection closes here, short of Content-Length
        h.wfile.write(body)

    def close(self) -> None:
        """Wake stalled answers, stop serving and free the port."""
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def serve():
    """Start FaultyServers for a test; all are shut down afterwards."""
    servers: list[FaultyServer] = []

    def start(root: Path, ranges: bool = True) -> FaultyServer:
        servers.append(FaultyServer(root, ranges))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def epoch(location, **kw) -> list[dict[str, torch.Tensor]]:
    """One evaluation pass (every remaining sample), 2 workers, the test's fast retry settings."""
    return list(loader(location, partial=True, **{**FAST, **kw}).iter_epoch())


def assert_same_batches(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    """Same batches in the same order with the same tensors."""
    assert indices(got) == indices(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            assert torch.equal(g[k], w[k]), k


@pytest.mark.parametrize("skip_corrupt", [False, True], ids=["strict", "skip-corrupt"])
@pytest.mark.parametrize("ranges", [True, False], ids=["range-resume", "reopen-and-skip"])
def test_drops_and_stalls_lose_and_repeat_nothing(tmp_path, serve, ranges, skip_corrupt):
    build_dataset(tmp_path / "ds")
    want = epoch(tmp_path / "ds")
    server = serve(tmp_path, ranges=ranges)
    server.schedule(SCHEDULE)
    ld = loader(f"{server.url}/ds", partial=True, skip_corrupt=skip_corrupt, **FAST)
    got = list(ld.iter_epoch())
    assert sorted(flat(indices(got))) == list(range(TOTAL))  # every sample once, none skipped
    assert_same_batches(got, want)
    assert ld.corrupt_skipped == 0 and ld.consumed.all()
    assert server.pending() == {}  # every scheduled fault was played
    assert any(r is not None for _, r in server.requests)  # resumes ask for the rest...
    assert (server.partial > 0) == ranges  # ...and get it where the server honours ranges
    for i, faults in SCHEDULE.items():
        assert server.count(shard_name(i)) >= len(faults) + 1


@pytest.mark.parametrize("fault", [("error",), ("drop", 0.33), ("stall", 0.33), ("stall-head",)])
@pytest.mark.parametrize("skip_corrupt", [False, True], ids=["strict", "skip-corrupt"])
def test_a_shard_that_always_fails_raises_after_bounded_retries(tmp_path, serve, fault, skip_corrupt):
    build_dataset(tmp_path / "ds")
    server = serve(tmp_path, ranges=False)
    server.schedule({2: [fault] * 50})
    kw = {**FAST, "read_retries": 2, "read_timeout_s": 0.3}
    ld = loader(f"{server.url}/ds", partial=True, num_workers=0, skip_corrupt=skip_corrupt, **kw)
    url = f"{server.url}/ds/{shard_name(2)}"
    given: list[int] = []
    with pytest.raises(ShardReadError, match=rf"{re.escape(url)}: remote read failed 3 time\(s\) in a row"):
        for batch in ld.iter_epoch():
            given += flat(indices([batch]))
    assert server.count(shard_name(2)) == 3  # the first attempt and 2 retries
    assert ld.corrupt_skipped == 0
    assert set(np.flatnonzero(ld.consumed).tolist()) == set(given)  # consumed = delivered, no more
    assert not ld.consumed[10:15].any()  # the shard held back in the shuffle buffer was never delivered


def test_missing_remote_shard_is_not_retried_nor_skipped(tmp_path, serve):
    build_dataset(tmp_path / "ds")
    (tmp_path / "ds" / shard_name(4)).unlink()
    server = serve(tmp_path)
    ld = loader(f"{server.url}/ds", partial=True, num_workers=0, skip_corrupt=True, **FAST)
    with pytest.raises(ShardReadError, match=r"shard-000004\.tar: HTTP 404 .*not retried"):
        list(ld.iter_epoch())
    assert server.count(shard_name(4)) == 1


def _break_header(path: Path, member: int) -> None:
    """Flip one name byte of a member's tar header (same size, so index.json's byte count still holds)."""
    data = bytearray(path.read_bytes())
    data[member * 1024 + 3] ^= 0x01  # members here are a 512-byte header plus one 512-byte data block
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("ranges", [True, False], ids=["range-resume", "reopen-and-skip"])
def test_corrupt_shards_served_remotely_are_skipped_and_counted(tmp_path, serve, ranges):
    location = tmp_path / "ds"
    build_dataset(location, payloads={12: b"\x28\xb5\x2f\xfd garbage"})  # bad zstd frame in shard 2
    _break_header(location / shard_name(4), 3)  # samples 23, 24 unreadable: header checksum fails
    faults = {2: [("drop", 0.5)], 4: [("drop", 0.15), ("stall", 0.1)]}  # both before the broken header
    server = serve(tmp_path, ranges=ranges)
    server.schedule(faults)
    with pytest.raises(ShardError, match=r"shard-000002\.tar/000000000012") as err:
        epoch(f"{server.url}/ds", num_workers=0, shuffle=False)
    assert not isinstance(err.value, ShardReadError)  # corruption, not a failed transfer
    server.schedule(faults)
    ld = loader(f"{server.url}/ds", partial=True, skip_corrupt=True, **FAST)
    seen = flat(indices(ld.iter_epoch()))
    lost = {12, 23, 24}
    assert sorted(seen) == sorted(set(range(TOTAL)) - lost)
    assert ld.corrupt_skipped == len(lost) and ld.consumed.all()
    assert server.pending() == {}


FLAKY = r"""#!/bin/sh
# flaky.sh STATE FILE: writes FILE to stdout, but its first runs fail on purpose (see SCRIPT_FAULTS).
name=$(basename "$2"); count="$1/$name.runs"
runs=$(cat "$count" 2>/dev/null || echo 0); echo $((runs + 1)) > "$count"
[ "$name" = index.json ] && exec cat "$2"
case "$name:$runs" in
  shard-000000.tar:0) head -c 3000 "$2"; exit 3 ;;
  shard-000001.tar:0) head -c 1500 "$2"; exec sleep 30 ;;
  shard-000001.tar:1) exit 1 ;;
  shard-000004.tar:0) cat "$2"; exit 7 ;;
esac
exec cat "$2"
"""


@pytest.mark.parametrize("skip_corrupt", [False, True], ids=["strict", "skip-corrupt"])
def test_pipe_command_that_fails_or_stalls_is_rerun(tmp_path, skip_corrupt):
    build_dataset(tmp_path / "ds")
    want = epoch(tmp_path / "ds")
    script, state = tmp_path / "flaky.sh", tmp_path / "state"
    script.write_text(FLAKY)
    state.mkdir()
    location = f"pipe:sh {script} {state} {tmp_path / 'ds'}"
    ld = loader(location, partial=True, skip_corrupt=skip_corrupt, **FAST)
    got = list(ld.iter_epoch())
    assert sorted(flat(indices(got))) == list(range(TOTAL))
    assert_same_batches(got, want)
    assert ld.corrupt_skipped == 0
    runs = {p.name: int(p.read_text()) for p in state.iterdir()}
    assert runs["shard-000000.tar.runs"] >= 2
    assert runs["shard-000001.tar.runs"] >= 3  # stalled, then exited 1, then served
    assert runs["shard-000004.tar.runs"] >= 2  # whole output but a non-zero exit: read again


def test_pipe_command_that_always_fails_names_the_shard(tmp_path):
    build_dataset(tmp_path / "ds")
    (tmp_path / "ds" / shard_name(3)).unlink()
    location = f"pipe:cat {tmp_path / 'ds'}"
    with pytest.raises(ShardReadError, match=rf"{re.escape(location)}/shard-000003\.tar: .*3 time\(s\)"):
        epoch(location, num_workers=0, read_retries=2, skip_corrupt=True)
