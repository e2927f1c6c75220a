"""Preemption signals: SIGUSR1 and SIGTERM only set a flag, and the ranks agree on it at a step boundary.

The trainer installs `StopFlag` before the model loads (a signal during a long load must not kill the
rank), checks it on every rank at the next step boundary (one all-reduce), saves a complete checkpoint
and exits with `EXIT_INTERRUPTED`; `restore` puts the previous handlers back when the run ends.
"""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """SIGUSR1/SIGTERM only set a flag; ranks agree on it at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        """Handle SIGUSR1 and SIGTERM by setting `signum`, keeping the previous handlers."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
