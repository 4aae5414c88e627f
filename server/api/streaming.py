"""Server-sent events for streamed chat completions.

One streamed completion is, in order: a chunk with `delta.role`, one chunk per piece
of new text, a chunk with `finish_reason`, a usage chunk with `choices: []` when the
client asked for it, and `data: [DONE]`. An engine error after the stream started, or
the end of the shutdown grace period, replaces the rest with one `data: {"error": ...}`
event before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import SERVER_ERROR, APIError, to_api_error
from server.api.lifecycle import Lifecycle
from server.engine.types import EngineClient, EngineError, RequestOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """Fields shared by every chunk of one completion."""

    id: str  # chatcmpl-..., also the engine's request id
    created: int  # Unix seconds
    model: str


def usage_dict(output: RequestOutput) -> dict[str, int]:
    """Return the OpenAI `usage` object from the last output of a request."""
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
    }


def sse_event(data: dict[str, Any] | str) -> str:
    """Encode one SSE `data:` event. A dict is sent as compact UTF-8 JSON."""
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def next_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Return the next output, or raise EngineError if the engine's stream ended without a finish reason."""
    try:
        return await anext(outputs)
    except StopAsyncIteration:
        raise EngineError("The engine ended the request without a finish reason.") from None


class ChatStream:
    """The SSE events of one streamed completion.

    `finished` turns true once the request is over: the engine reported a finish reason
    or an error, or reading its outputs failed (then the request is aborted at once).
    `close` aborts the engine request when the stream stops before, which means the
    client disconnected. When `shutdown` is set, the stream ends with the lifecycle's
    shutdown error and aborts the engine request.
    """

    def __init__(
        self,
        completion: Completion,
        first: RequestOutput,
        outputs: AsyncIterator[RequestOutput],
        engine: EngineClient,
        include_usage: bool,
        on_finish: Callable[[RequestOutput], None],
        on_abort: Callable[[], None],
        lifecycle: Lifecycle | None = None,
        shutdown: asyncio.Event | None = None,
    ):
        self.completion = completion
        self.first = first
        self.outputs = outputs
        self.engine = engine
        self.include_usage = include_usage
        self.on_finish = on_finish
        self.on_abort = on_abort
        self.lifecycle = lifecycle
        self.shutdown = shutdown
        self._cancelled_read: asyncio.Task | None = None
        self.finished = False

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion.id,
            "object": "chat.completion.chunk",
            "created": self.completion.created,
            "model": self.completion.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        return {
            "id": self.completion.id,
            "object": "chat.completion.chunk",
            "created": self.completion.created,
            "model": self.completion.model,
            "choices": [],
            "usage": usage_dict(last),
        }

    async def events(self) -> AsyncIterator[str]:
        """Yield the SSE events, ending with `data: [DONE]` unless the client disconnected."""
        yield sse_event(self.chunk({"role": "assistant", "content": ""}))
        output = self.first
        try:
            while True:
                if output.error is not None:
                    self.finished = True
                    logger.error("request %s failed in the engine: %s", self.completion.id, output.error)
                    yield sse_event(APIError(500, output.error, type=SERVER_ERROR, code="engine_error").to_dict())
                    break
                if output.text:
                    yield sse_event(self.chunk({"content": output.text}))
                if output.finish_reason is not None:
                    self.finished = True
                    yield sse_event(self.chunk({}, output.finish_reason))
                    if self.include_usage:
                        yield sse_event(self.usage_chunk(output))
                    self.on_finish(output)
                    break
                next_one = await self._next_output()
                if next_one is None:
                    self.engine.abort(self.completion.id)
                    self.finished = True
                    logger.info("request %s aborted at the end of the shutdown grace period", self.completion.id)
                    assert self.lifecycle is not None
                    yield sse_event(self.lifecycle.shutdown_error().to_dict())
                    break
                output = next_one
        except Exception as exc:  # after the headers went out, any failure can only end the stream
            self.engine.abort(self.completion.id)
            self.finished = True
            logger.error("request %s failed while streaming", self.completion.id, exc_info=True)
            yield sse_event(to_api_error(exc).to_dict())
        yield sse_event("[DONE]")

    async def _next_output(self) -> RequestOutput | None:
        """Return the next output, or None if the shutdown event is set first."""
        if self.shutdown is None:
            return await next_output(self.outputs)
        if self.shutdown.is_set():
            return None
        work = asyncio.ensure_future(next_output(self.outputs))
        stopper = asyncio.ensure_future(self.shutdown.wait())
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._cancel_read(work)
            raise
        finally:
            stopper.cancel()
        if work.done():
            return work.result()
        self._cancel_read(work)
        return None

    def _cancel_read(self, work: asyncio.Task) -> None:
        """Cancel a pending read of the engine's iterator.

        The cancellation closes the iterator inside that task, and closing it from here
        as well would fail while the task still runs it, so `close` leaves it alone.
        """
        work.cancel()
        self._cancelled_read = work

    async def close(self) -> None:
        """Abort the engine request unless it finished, then close the engine's iterator."""
        if self.lifecycle is not None and self.shutdown is not None:
            self.lifecycle.unwatch(self.shutdown)
        if not self.finished:
            self.engine.abort(self.completion.id)
            self.on_abort()
        close_outputs = getattr(self.outputs, "aclose", None)
        if close_outputs is not None and (self._cancelled_read is None or self._cancelled_read.done()):
            await close_outputs()


class SSEResponse(StreamingResponse):
    """A streaming response that closes its `ChatStream` however the stream ends.

    Starlette cancels the streaming task when the client disconnects; a stream that was
    cancelled, or never started, still gets `ChatStream.close`.
    """

    media_type = "text/event-stream"

    def __init__(self, stream: ChatStream, headers: dict[str, str] | None = None):
        sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(stream.events(), headers=sse_headers)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.close()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
