"""Graceful shutdown: the drain state that middleware and routes share, and the server that drives it.

After `begin_drain`, the middleware responds to new requests with 503 and /health returns
503, while the requests already running go on. `drain` waits for them until the grace
period ends, then sets the shutdown event of every chat completion still running: a
non-streamed one gets a 503 error object, a streamed one an error event and
`data: [DONE]`, and both abort their engine request.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn

from server.api.errors import SERVICE_UNAVAILABLE, APIError

logger = logging.getLogger(__name__)

# How long `drain` waits, after the grace period, for aborted requests to send their
# last bytes. They need one pass of the event loop, so this only guards against a hang.
ABORT_SETTLE_SECONDS = 5.0
POLL_SECONDS = 0.05


class Lifecycle:
    """Whether the server admits requests, how many are running, and how to stop them."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.draining = False
        self.aborting = False  # the grace period is over
        self.in_flight = 0
        self._shutdown_events: set[asyncio.Event] = set()

    def begin_drain(self) -> None:
        """Stop admitting requests. Only sets attributes, so it is safe in a signal handler."""
        self.draining = True

    def watch(self, shutdown: asyncio.Event) -> None:
        """Register a request's shutdown event, which is set when the grace period ends."""
        self._shutdown_events.add(shutdown)
        if self.aborting:
            shutdown.set()

    def unwatch(self, shutdown: asyncio.Event) -> None:
        self._shutdown_events.discard(shutdown)

    def abort_running(self) -> None:
        """Set the shutdown event of every running chat completion."""
        self.aborting = True
        for shutdown in list(self._shutdown_events):
            shutdown.set()

    async def drain(self) -> bool:
        """Stop admitting, wait up to the grace period for running requests, then abort the rest.

        Returns whether every request finished within the grace period.
        """
        self.begin_drain()
        deadline = time.monotonic() + self.grace_seconds
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        if not self.in_flight:
            logger.info("all requests finished; shutting down")
            return True

        logger.warning(
            "aborting %d running request(s) at the end of the %g s shutdown grace period",
            self.in_flight,
            self.grace_seconds,
        )
        self.abort_running()
        deadline = time.monotonic() + ABORT_SETTLE_SECONDS
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        if self.in_flight:
            logger.error("%d request(s) still running after they were aborted; closing anyway", self.in_flight)
        return False

    def shutdown_error(self) -> APIError:
        """Return the 503 error of a request aborted at the end of the grace period."""
        return APIError(
            503,
            f"The server is shutting down and stopped this request at the end of its {self.grace_seconds:g} s "
            "grace period. Send it again, to another instance if there is one.",
            type=SERVICE_UNAVAILABLE,
            code="server_shutting_down",
        )


def draining_error() -> APIError:
    """Return the 503 error of a request that arrives while the server shuts down."""
    return APIError(
        503,
        "The server is shutting down and accepts no new requests. Send the request to another instance, "
        "or retry when this one has restarted.",
        type=SERVICE_UNAVAILABLE,
        code="server_shutting_down",
    )


# After the drain, uvicorn waits this long for connections to close before it cancels
# their tasks. Requests have ended by then, so this only guards against a hang.
CLOSE_TIMEOUT_SECONDS = 5


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains running requests on SIGTERM and SIGINT before it stops.

    It replaces `uvicorn.Server.handle_exit`, the handler uvicorn installs for both
    signals. uvicorn's own handler stops at once and raises the signal again after the
    shutdown, so the process would end by the signal instead of with exit code 0.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self.lifecycle.draining or self.should_exit:
            logger.warning("received %s again: exiting without waiting for running requests", name)
            self.should_exit = True
            self.force_exit = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the server is not serving yet, so there is nothing to drain
            self.should_exit = True
            return
        logger.info(
            "received %s: rejecting new requests, giving %d running request(s) up to %g s to finish",
            name,
            self.lifecycle.in_flight,
            self.lifecycle.grace_seconds,
        )
        self.lifecycle.begin_drain()
        # A signal handler may interrupt the event loop anywhere, so the drain task is
        # created from a callback instead.
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        try:
            await self.lifecycle.drain()
        finally:
            self.should_exit = True
