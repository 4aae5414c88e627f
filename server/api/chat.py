"""POST /v1/chat/completions: validate, load images, prepare, submit, then stream or collect.

Blocking work (JSON parsing of large bodies, image fetching and decoding, the chat
template and tokenizer in `EngineClient.prepare`) runs in worker threads, never on the
event loop. A client that disconnects, a handler that is cancelled, or the end of the
shutdown grace period aborts the engine request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.api.errors import APIError, check_engine_available
from server.api.lifecycle import Lifecycle
from server.api.media import MediaPolicy
from server.api.protocol import ChatCompletionRequest, build_engine_messages, parse_chat_request
from server.api.streaming import ChatStream, Completion, SSEResponse, next_output, usage_dict
from server.config import ServerConfig
from server.engine.types import EngineClient, EngineError, RequestOutput

logger = logging.getLogger(__name__)

router = APIRouter()

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


class ShutdownRequested(Exception):
    """The shutdown grace period ended before the response was ready."""


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    config: ServerConfig = request.app.state.config
    engine: EngineClient = request.app.state.engine
    media: MediaPolicy = request.app.state.media_policy
    lifecycle: Lifecycle = request.app.state.lifecycle
    request_id: str = request.state.request_id
    started = time.monotonic()

    check_engine_available(engine)
    chat_request = await run_in_threadpool(parse_chat_request, await request.body(), config)
    check_model(chat_request.model, engine.model_name)
    messages = await run_in_threadpool(build_engine_messages, chat_request.messages, config, media)
    prompt = await run_in_threadpool(engine.prepare, messages)
    max_tokens = resolve_max_tokens(len(prompt.token_ids), chat_request, engine.max_model_len)

    completion = Completion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=engine.model_name)
    outputs = engine.submit(completion.id, prompt, chat_request.sampling_params(max_tokens))
    logger.debug("request %s submitted as %s with max_tokens=%d", request_id, completion.id, max_tokens)

    def log_finish(last: RequestOutput) -> None:
        logger.info(
            "request %s finished: completion_id=%s prompt_tokens=%d completion_tokens=%d finish_reason=%s seconds=%.3f",
            request_id,
            completion.id,
            last.prompt_tokens,
            last.completion_tokens,
            last.finish_reason,
            time.monotonic() - started,
        )

    def log_abort() -> None:
        logger.info(
            "request %s aborted after %.3f s: completion_id=%s, client disconnected",
            request_id,
            time.monotonic() - started,
            completion.id,
        )

    shutdown = asyncio.Event()
    lifecycle.watch(shutdown)
    handed_over = False  # true once the request finished or a ChatStream owns the abort
    try:
        first = await until_disconnected(request, next_output(outputs), shutdown)
        if chat_request.stream:
            stream = ChatStream(
                completion, first, outputs, engine, chat_request.include_usage, log_finish, log_abort,
                lifecycle=lifecycle, shutdown=shutdown,
            )
            handed_over = True
            return SSEResponse(stream)

        text, last = await until_disconnected(request, collect_text(first, outputs), shutdown)
        handed_over = True
        log_finish(last)
        return JSONResponse(completion_body(completion, text, last))
    except ClientDisconnected:
        log_abort()
        return Response(status_code=499)  # nginx's "client closed request", seen only in the access log
    except ShutdownRequested:
        logger.info("request %s aborted at the end of the shutdown grace period: completion_id=%s",
                    request_id, completion.id)
        raise lifecycle.shutdown_error() from None
    finally:
        if not handed_over:
            engine.abort(completion.id)
            lifecycle.unwatch(shutdown)


def check_model(requested: str | None, served: str) -> None:
    """Raise a 404 APIError when the request names a model other than the served one."""
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"The model '{requested}' does not exist on this server. Use '{served}' (listed by GET /v1/models).",
            param="model",
            code="model_not_found",
        )


def resolve_max_tokens(prompt_tokens: int, chat_request: ChatCompletionRequest, max_model_len: int) -> int:
    """Return the output token budget, which defaults to the context left after the prompt.

    Raises a 400 APIError with code `context_length_exceeded` when the prompt and the
    requested output do not fit in `max_model_len`.
    """
    room = max_model_len - prompt_tokens
    requested = chat_request.requested_max_tokens
    if room <= 0:
        raise APIError(
            400,
            f"The prompt has {prompt_tokens} tokens, which leaves no room for output in the model's context "
            f"of {max_model_len} tokens. Shorten the messages or send fewer or smaller images.",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is not None and requested > room:
        name = "max_completion_tokens" if chat_request.max_completion_tokens is not None else "max_tokens"
        raise APIError(
            400,
            f"The prompt has {prompt_tokens} tokens and {name} is {requested}, {prompt_tokens + requested} in all, "
            f"more than the model's context of {max_model_len} tokens. "
            f"Set {name} to at most {room} or shorten the messages.",
            param=name,
            code="context_length_exceeded",
        )
    return room if requested is None else requested


async def collect_text(first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> tuple[str, RequestOutput]:
    """Join the text of all outputs and return it with the last output. Raises EngineError."""
    pieces: list[str] = []
    output = first
    while True:
        pieces.append(output.text)
        if output.error is not None:
            raise EngineError(output.error)
        if output.finish_reason is not None:
            return "".join(pieces), output
        output = await next_output(outputs)


def completion_body(completion: Completion, text: str, last: RequestOutput) -> dict[str, Any]:
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": last.finish_reason,
            }
        ],
        "usage": usage_dict(last),
    }


async def until_disconnected(request: Request, awaitable: Awaitable[T], shutdown: asyncio.Event) -> T:
    """Await `awaitable`, unless the client leaves or `shutdown` is set first.

    Then it cancels `awaitable` and raises ClientDisconnected or ShutdownRequested. The
    request body must have been read, so that the next ASGI message is the disconnect.
    """
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    stopper = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait({work, watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        watcher.cancel()
        stopper.cancel()
    if work.done():
        return work.result()
    work.cancel()
    if shutdown.is_set():
        raise ShutdownRequested
    raise ClientDisconnected


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
