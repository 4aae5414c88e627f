"""OpenAI chat-completions request schema and its translation into engine inputs.

`parse_chat_request` turns the raw body into a validated `ChatCompletionRequest`,
rejecting every field that would change the result but is not supported.
`build_engine_messages` decodes the images and produces the messages that
`EngineClient.prepare` takes. Both do CPU work, so the route calls them in a worker
thread.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.api.errors import APIError, validation_error
from server.api.images import load_image
from server.api.media import MediaPolicy
from server.config import ServerConfig
from server.engine.types import SamplingParams


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted and ignored, because the processor sets the resolution


class ContentPart(BaseModel):
    """One part of a message's content: a text part or an image part."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class ChatCompletionRequest(BaseModel):
    """Body of POST /v1/chat/completions. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored

    # Not supported yet. They change the result, so a request that uses them gets a 400.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        """Return `max_completion_tokens`, the newer name, else `max_tokens`."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Return the engine's sampling settings. A top_k of -1 or 0 turns top-k filtering off."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            seed=self.seed,
            stop=self.stop_list,
        )


def parse_chat_request(body: bytes, config: ServerConfig) -> ChatCompletionRequest:
    """Parse and validate a request body, or raise a 400 APIError that names the invalid parameter.

    `config` sets the limits on stop sequences.
    """
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(
            400,
            f"Malformed JSON in the request body: {exc}. Send one JSON object with Content-Type: application/json.",
            code="invalid_json",
        ) from exc
    if not isinstance(data, dict):
        raise APIError(
            400,
            f"The request body must be a JSON object, got a JSON {type(data).__name__}.",
            code="invalid_json",
        )
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from exc
    _check_supported(request)
    _check_stop(request.stop_list, config)
    _check_messages(request.messages)
    return request


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _unsupported(param: str, hint: str = "") -> APIError:
    message = f"The parameter '{param}' is not supported by this server."
    return APIError(400, f"{message} {hint}".strip(), param=param, code="unsupported_parameter")


def _check_supported(request: ChatCompletionRequest) -> None:
    """Raise a 400 for each field whose value would change the result but is not implemented."""
    if request.n is not None and request.n != 1:
        raise _unsupported("n", f"Only n=1 is supported, got {request.n}. Send one request per choice.")

    if request.tools:
        raise _unsupported("tools", "Remove 'tools', because tool calling is not implemented.")
    if request.tool_choice not in (None, "none", "auto"):
        raise _unsupported("tool_choice", "Remove 'tool_choice', because tool calling is not implemented.")
    if request.functions:
        raise _unsupported("functions", "Remove 'functions', because function calling is not implemented.")
    if request.function_call not in (None, "none", "auto"):
        raise _unsupported("function_call", "Remove 'function_call', because function calling is not implemented.")
    if request.response_format is not None and request.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", 'Only {"type": "text"} is supported.')

    if request.logprobs:
        raise _unsupported("logprobs", "Set 'logprobs' to false, because log probabilities are not implemented.")
    if request.top_logprobs:
        raise _unsupported("top_logprobs", "Remove 'top_logprobs', because log probabilities are not implemented.")

    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise _unsupported(name, f"Set '{name}' to 0, because penalties are not implemented.")
    if request.logit_bias:
        raise _unsupported("logit_bias", "Remove 'logit_bias', because it is not implemented.")

    if request.stream_options is not None and not request.stream:
        raise APIError(
            400,
            "The parameter 'stream_options' is only allowed when 'stream' is true.",
            param="stream_options",
            code="invalid_value",
        )


def _check_stop(stop: list[str], config: ServerConfig) -> None:
    if len(stop) > config.max_stop_sequences:
        raise APIError(
            400,
            f"'stop' has {len(stop)} sequences, more than the maximum of {config.max_stop_sequences}. "
            "Send fewer, or raise --max-stop-sequences (SPECVLM_MAX_STOP_SEQUENCES) on the server.",
            param="stop",
            code="too_many_stop_sequences",
        )
    for index, sequence in enumerate(stop):
        if len(sequence) > config.max_stop_sequence_length:
            raise APIError(
                400,
                f"'stop[{index}]' has {len(sequence)} characters, more than the maximum of "
                f"{config.max_stop_sequence_length}. Shorten it, or raise --max-stop-sequence-length "
                "(SPECVLM_MAX_STOP_SEQUENCE_LENGTH) on the server.",
                param=f"stop[{index}]",
                code="stop_sequence_too_long",
            )
        if not sequence:
            raise APIError(
                400,
                f"'stop[{index}]' is an empty string. Every stop sequence needs at least one character.",
                param=f"stop[{index}]",
                code="invalid_value",
            )


def _check_messages(messages: list[ChatMessage]) -> None:
    """Raise a 400 for parts that lack their field and for images outside user messages."""
    for message_index, message in enumerate(messages):
        if isinstance(message.content, str):
            continue
        for part_index, part in enumerate(message.content):
            param = f"messages[{message_index}].content[{part_index}]"
            if part.type == "text" and part.text is None:
                raise APIError(400, f"Missing required parameter '{param}.text' of a text part.", param=f"{param}.text")
            if part.type == "image_url" and part.image_url is None:
                raise APIError(
                    400,
                    f"Missing required parameter '{param}.image_url' of an image_url part.",
                    param=f"{param}.image_url",
                )
            if part.type == "image_url" and message.role != "user":
                raise APIError(
                    400,
                    f"'{param}' is an image in a message with role {message.role!r}. Images are accepted in user messages only.",
                    param=param,
                    code="invalid_value",
                )


def count_images(messages: list[ChatMessage]) -> int:
    return sum(
        1
        for message in messages
        if not isinstance(message.content, str)
        for part in message.content
        if part.type == "image_url"
    )


def build_engine_messages(
    messages: list[ChatMessage], config: ServerConfig, media: MediaPolicy
) -> list[dict[str, Any]]:
    """Read and decode the images and return messages in the form `EngineClient.prepare` takes.

    Image parts become `{"type": "image", "image": PIL.Image}` in RGB. Raises a 400
    APIError when there are more images than `config.max_images_per_request`, and the
    errors of `load_image` for each image.
    """
    num_images = count_images(messages)
    if num_images > config.max_images_per_request:
        raise APIError(
            400,
            f"The request has {num_images} images, more than the maximum of {config.max_images_per_request}. "
            "Send fewer images or raise --max-images-per-request (SPECVLM_MAX_IMAGES_PER_REQUEST) on the server.",
            param="messages",
            code="too_many_images",
        )

    engine_messages: list[dict[str, Any]] = []
    for message_index, message in enumerate(messages):
        if isinstance(message.content, str):
            engine_messages.append({"role": message.role, "content": message.content})
            continue
        parts: list[dict[str, Any]] = []
        for part_index, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                assert part.image_url is not None  # checked by _check_messages
                param = f"messages[{message_index}].content[{part_index}].image_url"
                image = load_image(part.image_url.url, param, config.max_image_pixels, media)
                parts.append({"type": "image", "image": image})
        engine_messages.append({"role": message.role, "content": parts})
    return engine_messages
