"""ASGI middleware around every HTTP request: request id, API key, shutdown, body size limit.

It also turns any exception that escapes the routes into the 500 error object, so
that every error response carries the `X-Request-Id` header and the id is logged
with the traceback.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import AUTHENTICATION, APIError, error_response, log_error, to_api_error
from server.api.lifecycle import Lifecycle, draining_error
from server.config import ServerConfig

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"

# Monitoring paths: they stay open while the server shuts down, and they are not
# counted as running requests. /health and /metrics need the API key only when
# health_requires_api_key and metrics_requires_api_key are set. /version never does.
MONITORING_PATHS = frozenset({"/health", "/metrics"})

# A client's own request id is echoed only if it is short and printable, so that it
# cannot break a log line or a response header.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


class _ClientGone(Exception):
    """The client disconnected before it sent the whole request body."""


def open_paths(config: ServerConfig) -> frozenset[str]:
    """Return the paths that need no API key under `config`."""
    paths = {"/version"}
    if not config.health_requires_api_key:
        paths.add("/health")
    if not config.metrics_requires_api_key:
        paths.add("/metrics")
    return frozenset(paths)


class RequestContextMiddleware:
    """Assign the request id, check the API key, reject requests while shutting down,
    count running requests and read the body within `max_body_bytes`."""

    def __init__(self, app: ASGIApp, config: ServerConfig, lifecycle: Lifecycle):
        self.app = app
        self.api_key = config.api_key
        self.open_paths = open_paths(config)
        self.max_body_bytes = config.max_body_bytes
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = Headers(scope=scope)
        request_id = _request_id(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        counted = False
        try:
            self._check_api_key(scope["path"], headers)
            if scope["path"] not in MONITORING_PATHS:
                if self.lifecycle.draining:
                    raise draining_error()
                self.lifecycle.in_flight += 1
                counted = True
            replay = await self._read_body(headers, receive)
            await self.app(scope, replay, send_with_request_id)
        except _ClientGone:
            logger.info("request %s: client disconnected while sending the body", request_id)
        except Exception as exc:
            error = to_api_error(exc)
            log_error(request_id, error, exc)
            if response_started:
                raise
            await error_response(error)(scope, receive, send_with_request_id)
        finally:
            if counted:
                self.lifecycle.in_flight -= 1

    def _check_api_key(self, path: str, headers: Headers) -> None:
        """Raise a 401 APIError unless the path is open or the bearer token matches."""
        if self.api_key is None or path in self.open_paths:
            return
        # RFC 6750: a 401 for a bearer token names the scheme in WWW-Authenticate.
        authorization = headers.get("authorization")
        if not authorization:
            raise APIError(
                401,
                "Missing API key. Send the header 'Authorization: Bearer <key>' with the server's --api-key.",
                type=AUTHENTICATION,
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(
                401,
                "Invalid API key. Send 'Authorization: Bearer <key>' with the key the server was started with.",
                type=AUTHENTICATION,
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    async def _read_body(self, headers: Headers, receive: Receive) -> Receive:
        """Read the whole body within the limit and return a `receive` that replays it.

        After the body, the returned callable passes on the server's own messages, so
        that the routes still see `http.disconnect`.
        """
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _body_too_large(f"{int(declared)} bytes", self.max_body_bytes)

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _body_too_large(f"over {self.max_body_bytes} bytes", self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        body = b"".join(chunks)
        body_replayed = False

        async def replay() -> Message:
            nonlocal body_replayed
            if not body_replayed:
                body_replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _request_id(headers: Headers) -> str:
    """Return the client's X-Request-Id if it is well-formed, else a new random id."""
    client_id = headers.get(REQUEST_ID_HEADER)
    if client_id and _CLIENT_REQUEST_ID.fullmatch(client_id):
        return client_id
    return uuid.uuid4().hex


def _body_too_large(size: str, limit: int) -> APIError:
    return APIError(
        413,
        f"Request body is {size}, over the limit of {limit} bytes. "
        "Send smaller or fewer images, or raise --max-body-bytes (SPECVLM_MAX_BODY_BYTES) on the server.",
        code="request_too_large",
    )
