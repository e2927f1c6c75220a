"""Remote shard reads that survive hiccups: ``pipe:`` commands and http(s) URLs, retried and resumed.

`open_shard` opens one shard URL. A remote one (``pipe:`` commands, http(s) URLs, the latter opened with
urllib) becomes a `RemoteStream`, which survives hiccups: a dropped connection, an HTTP 5xx (or
408/425/429), a command that exits non-zero, or a read that gets no byte for ``read_timeout_s`` (a stall)
fails one attempt, and the shard is reopened after a backoff of ``retry_backoff_s`` doubling per failure in
a row, capped at ``retry_backoff_max_s``. The reader sees one continuous byte stream: a new attempt starts
at the byte already handed to the tar parser (an HTTP ``Range`` request when the server honours it, else the
first bytes are read again and dropped), so no sample is yielded twice or skipped, and memory stays one read
buffer rather than a whole shard. The stream ends only once the transport confirms it (the command exited 0,
the body matched its Content-Length, and the shard's ``bytes`` in index.json arrived); a short read is
therefore a failed attempt, never a truncated shard. After ``read_retries`` failures in a row (a failure
after new bytes arrived starts the count afresh, which stays bounded by the shard's size) or an HTTP 4xx
such as 404, `ShardReadError` names the URL and the attempts and stops the run, with or without
``skip_corrupt``. Other URL schemes are opened by webdataset's ``gopen`` once, like a local file; index.json
is fetched at start by `spellm_ds.data.shards.read_index` (``gopen`` too), outside these retries.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from spellm_ds.errors import ShardError


class ShardReadError(ShardError):
    """A remote shard could not be read: its retries ran out or the server refused it for good."""


class _TransientError(Exception):
    """One attempt at a remote read failed in a way the next attempt may not (drop, stall, failed command)."""


class _RangeRefusedError(_TransientError):
    """The server answered a resume request with bytes from another offset; resume without ranges."""


class _PermanentError(Exception):
    """The server's answer rules out a retry (HTTP 404, 403, ...)."""


_CHUNK = 1 << 20  # most bytes asked of one connection per read
_RETRY_HTTP = frozenset({408, 425, 429})  # client-error answers that mean "try again later"
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-")


@dataclass(frozen=True)
class RetryPolicy:
    """How remote reads retry: failed attempts in a row allowed, backoff and stall timeout in seconds."""

    retries: int
    backoff_s: float
    backoff_max_s: float
    timeout_s: float

    def wait(self, failures: int) -> float:
        """Seconds to wait before the next attempt after `failures` failed attempts in a row."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (failures - 1))


def is_remote(url: str) -> bool:
    """Whether a shard URL is read over a transport whose failures are retried (``pipe:``, http(s))."""
    return url.startswith(("pipe:", "http://", "https://"))


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no data for {timeout:g} s (stalled)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _HttpSource:
    """One GET of a shard, asking for the bytes from `start` on when ranges are in use."""

    def __init__(self, url: str, start: int, timeout: float, use_range: bool) -> None:
        self.timeout = timeout
        headers = {"Range": f"bytes={start}-"} if start and use_range else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            what = f"HTTP {exc.code} {exc.reason}"
            if exc.code == 416:
                raise _RangeRefusedError(what) from None
            if 400 <= exc.code < 500 and exc.code not in _RETRY_HTTP:
                raise _PermanentError(what) from None
            raise _TransientError(what) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _TransientError(f"cannot connect ({_describe(exc, timeout)})") from None
        self._resp = resp
        self.offset = 0  # byte of the shard this response starts at
        if resp.status == 206:
            got = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if got is None or int(got.group(1)) != start:
                self.close()
                got_range = resp.headers.get("Content-Range")
                raise _RangeRefusedError(f"asked for bytes {start}- and got {got_range!r}")
            self.offset = start
        length = resp.headers.get("Content-Length", "")
        self.end = self.offset + int(length) if length.isdigit() else None  # where this response ends

    def read(self, n: int) -> bytes:
        try:
            return self._resp.read(n)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _TransientError(_describe(exc, self.timeout)) from None

    def finish(self) -> None:
        """Nothing left to confirm: the stream has checked the bytes received against Content-Length."""

    def close(self) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            self._resp.close()


class _PipeSource:
    """One run of a ``pipe:`` command in its own process group, read with a stall timeout."""

    def __init__(self, cmd: str, timeout: float) -> None:
        self.timeout, self.offset, self.end = timeout, 0, None
        self._finished = False
        try:
            self._proc = subprocess.Popen(
                cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
            )
        except OSError as exc:
            raise _TransientError(f"cannot start the command ({exc})") from None
        self._fd = self._proc.stdout.fileno()
        self._poll = select.poll()  # unlike select(), not limited to small descriptor numbers
        self._poll.register(self._fd, select.POLLIN)

    def read(self, n: int) -> bytes:
        if not self._poll.poll(self.timeout * 1000):
            raise _TransientError(f"no output for {self.timeout:g} s (stalled)")
        try:
            return os.read(self._fd, n)
        except OSError as exc:
            raise _TransientError(_describe(exc, self.timeout)) from None

    def finish(self) -> None:
        try:
            status = self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise _TransientError(f"the command ran on {self.timeout:g} s after its output ended") from None
        if status != 0:
            raise _TransientError(f"the command exited with status {status}")
        self._finished = True

    def close(self) -> None:
        if not self._finished:  # stopped early or failed: end the command and whatever it started
            with contextlib.suppress(OSError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.stdout.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=self.timeout)


class RemoteStream:
    """A remote shard as one forward-only byte stream that reconnects after transient failures.

    An attempt opens the shard at the offset already handed out: an HTTP ``Range`` request when the
    server honours it, else a fresh GET or a rerun of the ``pipe:`` command whose first bytes are read
    again and dropped. The reader thus sees every byte once and in order, and memory stays bounded by
    one read. The end of the stream is reported only after the transport confirmed it: the command
    exited with status 0, the body matched its Content-Length, and at least index.json's byte count
    arrived; anything short is a dropped transfer, not a truncated shard.
    """

    def __init__(self, url: str, size: int | None, policy: RetryPolicy) -> None:
        self.url, self.size, self.policy = url, size, policy
        self.pos = 0  # bytes handed out
        self.attempts = 0  # connections (or command runs) opened
        self._failures = 0  # failed attempts since bytes last arrived
        self._src: _HttpSource | _PipeSource | None = None
        self._range = True
        self._done = False

    def _open(self) -> _HttpSource | _PipeSource:
        self.attempts += 1
        if self.url.startswith("pipe:"):
            src: _HttpSource | _PipeSource = _PipeSource(self.url[5:], self.policy.timeout_s)
        else:
            src = _HttpSource(self.url, self.pos, self.policy.timeout_s, self._range)
        try:
            skip = self.pos - src.offset
            while skip > 0:
                data = src.read(min(skip, _CHUNK))
                if not data:
                    raise _TransientError(f"stream ended at byte {self.pos - skip}, before the resume point")
                skip -= len(data)
        except BaseException:
            src.close()
            raise
        return src

    def _check_end(self, src: _HttpSource | _PipeSource) -> None:
        src.finish()
        if src.end is not None and self.pos < src.end:
            raise _TransientError(f"connection closed after {self.pos} of {src.end} bytes")
        if self.size is not None and self.pos < self.size:
            raise _TransientError(f"stream ended after {self.pos} of the {self.size} bytes index.json lists")

    def _close_src(self) -> None:
        src, self._src = self._src, None
        if src is not None:
            src.close()

    def _failed(self, reason: str) -> None:
        self._close_src()
        self._failures += 1
        if self._failures > self.policy.retries:
            self._done = True
            raise ShardReadError(
                f"{self.url}: remote read failed {self._failures} time(s) in a row ({self.attempts} "
                f"attempt(s) in all, {self.pos} bytes read); last error: {reason}"
            )
        time.sleep(self.policy.wait(self._failures))

    def read(self, n: int) -> bytes:
        """Return up to `n` next bytes of the shard (b"" only at its confirmed end)."""
        while not self._done and n > 0:
            try:
                if self._src is None:
                    self._src = self._open()
                data = self._src.read(min(n, _CHUNK))
                if data:
                    self.pos += len(data)
                    self._failures = 0
                    return data
                self._check_end(self._src)
                self._close_src()
                self._done = True
            except _TransientError as exc:
                if isinstance(exc, _RangeRefusedError):
                    self._range = False
                self._failed(str(exc))
            except _PermanentError as exc:
                self._close_src()
                self._done = True
                raise ShardReadError(f"{self.url}: {exc} (not retried)") from None
        return b""

    def drain(self) -> None:
        """Read past the end-of-archive marker to the confirmed end, so a failed transfer is noticed."""
        while self.read(_CHUNK):
            pass

    def close(self) -> None:
        """Drop the connection or end the command."""
        self._done = True
        self._close_src()


def open_shard(url: str, size: int | None, policy: RetryPolicy) -> Any:
    """Open a shard for reading: a remote one as a retried `RemoteStream`, any other with ``gopen``."""
    if not is_remote(url):
        return wds.gopen(url, "rb")
    if url.startswith("pipe:") and wds.utils.enforce_security:
        raise ShardReadError(f"{url}: pipe: locations are disabled (WDS_SECURE is set)")
    return RemoteStream(url, size, policy)
