"""A scripted `EngineClient` for API tests: no model, no thread, outputs from a list.

`FakeEngine.submit` yields one `RequestOutput` per script piece from the event loop.
Switches make it fail the way the real engine can: a full queue, not ready, dead, an
error output after some pieces, a `PromptError` from `prepare`, a stream that never
finishes (for disconnect tests), or one whose last piece waits for an event. It records what it was given and every abort.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server.engine.types import (
    FINISH_LENGTH,
    FINISH_STOP,
    PreparedPrompt,
    PromptError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)

DEFAULT_SCRIPT = ("Hello", ",", " wörld", " ✓", "!")
VISUAL_TOKENS_PER_IMAGE = 4


@dataclass
class Submission:
    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams


@dataclass
class FakeEngine:
    """Implements `server.engine.types.EngineClient` with scripted outputs."""

    model_name: str = "fake-vlm"
    model_description: str = "Scripted engine for tests, which ignores the prompt."
    max_model_len: int = 64
    script: tuple[str, ...] = DEFAULT_SCRIPT

    # Failure switches.
    is_ready: bool = True
    is_alive: bool = True
    queue_full: bool = False
    error_after: int | None = None  # pieces sent before an output with `error` set
    prompt_error: PromptError | None = None
    prepare_exception: Exception | None = None
    never_finish: bool = False  # after the script, wait until cancelled
    finish_gate: asyncio.Event | None = None  # when set, the last piece waits for this event

    # Records.
    prepared: list[list[dict[str, Any]]] = field(default_factory=list)
    submitted: list[Submission] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.is_ready

    @property
    def alive(self) -> bool:
        return self.is_alive

    def prepare(self, messages: list[dict[str, Any]]) -> PreparedPrompt:
        """Count one token per whitespace-separated word and VISUAL_TOKENS_PER_IMAGE per image."""
        self.prepared.append(messages)
        if self.prepare_exception is not None:
            raise self.prepare_exception
        if self.prompt_error is not None:
            raise self.prompt_error

        num_tokens = 0
        num_images = 0
        for message in messages:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    num_tokens += len(part["text"].split())
                else:
                    num_images += 1
        num_visual_tokens = num_images * VISUAL_TOKENS_PER_IMAGE
        return PreparedPrompt(
            token_ids=list(range(num_tokens + num_visual_tokens)),
            pixel_values=None,
            num_images=num_images,
            num_visual_tokens=num_visual_tokens,
        )

    def submit(self, request_id: str, prompt: PreparedPrompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self.queue_full:
            raise QueueFullError("The request queue is full (64 waiting).")
        self.submitted.append(Submission(request_id, prompt, params))
        return self._outputs(request_id, len(prompt.token_ids), params)

    async def _outputs(self, request_id: str, prompt_tokens: int, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        pieces = self.script[: params.max_tokens]
        finish_reason = FINISH_LENGTH if len(self.script) > params.max_tokens else FINISH_STOP
        for index, piece in enumerate(pieces):
            await asyncio.sleep(0)
            if self.error_after == index:
                yield RequestOutput(request_id, prompt_tokens=prompt_tokens, error="The engine failed on purpose.")
                return
            is_last = index == len(pieces) - 1 and not self.never_finish
            if is_last and self.finish_gate is not None:
                await self.finish_gate.wait()
            yield RequestOutput(
                request_id,
                text=piece,
                token_ids=[index],
                finish_reason=finish_reason if is_last else None,
                prompt_tokens=prompt_tokens,
                completion_tokens=index + 1,
            )
        if self.never_finish:
            await asyncio.Event().wait()

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
