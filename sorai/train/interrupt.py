"""Ctrl-C (SIGINT) and SIGTERM during training: noted by a handler, acted on by the loop at the
next step boundary (save a checkpoint, stop), so an interrupted run loses nothing."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's status for a process stopped by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequests:
    """`with StopRequests() as stop:` ... `stop.signum` is the first SIGINT/SIGTERM received
    (0: none). A second signal while the first is pending stops at once, as if no handler had
    been installed (a run stuck in a step can still be interrupted). Outside the main thread
    Python cannot install handlers: nothing is caught there."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            self._restore()
            os.kill(os.getpid(), signum)  # delivered again, to the handler there was before
            return
        self.signum = signum

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            # None: a handler not set from Python; the default is the closest there is.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()
