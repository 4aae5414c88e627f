"""Types shared by the HTTP front end and the engine thread.

The API layer builds a `PreparedPrompt` (through `Engine.prepare`) and `SamplingParams`,
submits them, and reads `RequestOutput` items from the returned stream. Nothing here
contains a model; torch appears only as the type of the image tensor.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


class EngineError(RuntimeError):
    """The engine failed while serving a request; the message is safe to show."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its configured maximum; the client should retry later."""


class PromptError(ValueError):
    """The prompt cannot be served as given (bad content, too long, wrong image count)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class SamplingParams:
    """Decoding settings of one request, already validated by the API layer."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy decoding
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep decoding past EOS to max_tokens, for benchmarks with fixed lengths

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class PreparedPrompt:
    """A tokenized chat prompt with its images preprocessed for the vision tower."""

    token_ids: list[int]
    pixel_values: torch.Tensor | None  # [num_images, 3, height, width] or None
    num_images: int = 0
    num_visual_tokens: int = 0  # placeholder positions in token_ids


@dataclass
class RequestOutput:
    """One increment of a request's result, pushed from the engine thread.

    `text` is the new text since the previous output (valid UTF-8, never part of a stop
    string). The last output of a request has `finish_reason` set, and `error` is set
    instead when the engine failed.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    spec_steps: int = 0  # speculative steps run for this request so far
    spec_accepted_tokens: int = 0  # draft tokens accepted and returned over those steps
    compressor_choices: list[str] = field(default_factory=list)  # per image, on the last output
    draft_visual_tokens: int = 0  # visual tokens the draft saw, on the last output


class EngineClient(typing.Protocol):
    """Engine interface used by the HTTP layer; `server.engine.engine.Engine` implements it.

    `messages` given to `prepare` are chat messages whose content is a string or a list
    of parts `{"type": "text", "text": str}` and `{"type": "image", "image": PIL.Image}`.
    """

    model_name: str  # the id served by /v1/models and accepted in requests
    model_description: str  # one line for /v1/models and logs
    max_model_len: int

    @property
    def ready(self) -> bool:
        """True once the models are loaded and the engine thread runs."""

    @property
    def alive(self) -> bool:
        """False after the engine thread died; /health then returns 503."""

    def prepare(self, messages: list[dict]) -> PreparedPrompt:
        """Apply the chat template, tokenize and preprocess images (CPU work, thread-safe).

        Call it from a worker thread, never on the event loop. Raises PromptError.
        """

    def submit(
        self, request_id: str, prompt: PreparedPrompt, params: SamplingParams
    ) -> typing.AsyncIterator[RequestOutput]:
        """Queue a request; call on the event loop. Raises QueueFullError.

        The iterator yields outputs until one has `finish_reason` or `error` set.
        """

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone); thread-safe and idempotent. Its slot is freed within one step."""
