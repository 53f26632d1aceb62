"""Stop strings in streamed text: emit only what cannot be the start of one."""

from __future__ import annotations

from collections.abc import Sequence

from sorai.errors import SamplingError

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Finds stop strings in streamed text, emitting only text that cannot be part of one.

    feed() each detokenized piece; it returns (text safe to emit now, stopped). A tail that
    could still grow into a stop string is held back; on a match the output is cut before the
    earliest stop string (which is not emitted, as in the OpenAI API). flush() returns the
    held-back tail once generation ends without a match.
    """

    def __init__(self, stop: Sequence[str] | str = ()) -> None:
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not s for s in stop):
            raise SamplingError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stop = stop
        self._max_hold = max((len(s) for s in stop), default=1) - 1
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, if any

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return piece, False
        text = self._held + piece
        # Earliest occurrence wins; the held tail is shorter than any stop string, so a match
        # can only start in it or in the new piece, and searching `text` covers both.
        best, best_stop = -1, None
        for s in self.stop:
            at = text.find(s)
            if at != -1 and (best == -1 or at < best):
                best, best_stop = at, s
        if best_stop is not None:
            self.stopped, self.matched, self._held = True, best_stop, ""
            return text[:best], True
        hold = 0
        for n in range(min(len(text), self._max_hold), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                hold = n
                break
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Return and clear the held-back tail (call when generation ends)."""
        held, self._held = self._held, ""
        return held
