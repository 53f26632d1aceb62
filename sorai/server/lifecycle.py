"""The API requests running now, so that a shutdown can end each in time: after the grace
period, with an error the client sees (a stream: a final error event) rather than a bare close.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from sorai.server.errors import APIError, engine_unavailable


class Stoppable(Protocol):
    """A running API request (sorai/server/runner.py's Generation)."""

    priority: int  # its engine priority: 0 for clients, higher for a batch's lines

    def expire(self, error: APIError) -> None: ...


def shutting_down(grace: float) -> APIError:
    return engine_unavailable(
        f"the server is shutting down and this request was still running after the {grace:g} s "
        "grace period; it was stopped"
    )


class Running:
    """The API requests on the engine now."""

    def __init__(self) -> None:
        self.generations: set[Stoppable] = set()
        self.stopping = False
        self.refusal: APIError | None = None  # for requests that arrive after the grace period
        # time.monotonic() when the latest client request (priority 0) ended: a batch starts
        # no new line until client traffic has been quiet a while (server/batch_runner.py).
        self.interactive_ended = float("-inf")

    def interactive(self) -> bool:
        """Whether a client request (not a batch's line) is running now."""
        return any(g.priority == 0 for g in self.generations)

    def begin_shutdown(self, grace: float) -> None:
        """The server stops: requests still running after `grace` seconds end with an error.
        Runs on the event loop."""
        if self.stopping:
            return
        self.stopping = True
        asyncio.get_running_loop().call_later(grace, self._expire_all, shutting_down(grace))

    def _expire_all(self, error: APIError) -> None:
        self.refusal = error
        for generation in list(self.generations):
            generation.expire(error)
