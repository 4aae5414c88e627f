"""The HTTP error type and the one mapping from exceptions to OpenAI error objects.

Every error response has the body `{"error": {"message", "type", "param", "code"}}`.
`to_api_error` decides status and body for any exception, `handle_exception` is the
FastAPI exception handler built on it, and `RequestContextMiddleware` uses the same
mapping for exceptions that escape the routes.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from server.engine.types import EngineClient, EngineError, PromptError, QueueFullError

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"

# NOTE: a guess, because the engine does not report when a slot frees up.
RETRY_AFTER_SECONDS = 1

INTERNAL_ERROR_MESSAGE = "Internal server error. The server log has the details under this request's X-Request-Id."


class APIError(Exception):
    """An error that goes to the client as an OpenAI error object with `status_code`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        """Return the OpenAI error object, also used as an SSE event after a stream started."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the status and error object sent to the client.

    Unknown exceptions become a 500 whose message hides the internals.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PromptError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, QueueFullError):
        message = str(exc).strip() or "The request queue is full."
        if not message.endswith("."):
            message += "."
        return APIError(
            429,
            f"{message} Retry after {RETRY_AFTER_SECONDS} s, or raise --max-waiting-requests on the server.",
            type=RATE_LIMIT,
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, EngineError):
        return APIError(500, str(exc) or INTERNAL_ERROR_MESSAGE, type=SERVER_ERROR, code="engine_error")
    if isinstance(exc, RequestValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        return _http_exception_error(exc)
    return APIError(500, INTERNAL_ERROR_MESSAGE, type=SERVER_ERROR, code="internal_error")


def _http_exception_error(exc: StarletteHTTPException) -> APIError:
    """Map Starlette's routing errors (unknown path, wrong method) to the error object."""
    if exc.status_code == 404:
        message = "Not found. The routes are POST /v1/chat/completions, GET /v1/models, /health, /metrics and /version."
        return APIError(404, message, code="not_found", headers=exc.headers)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"Method not allowed on this path. Use {allowed}." if allowed else "Method not allowed on this path."
        return APIError(405, message, code="method_not_allowed", headers=exc.headers)
    error_type = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
    return APIError(exc.status_code, str(exc.detail), type=error_type, headers=exc.headers)


def log_error(request_id: str, error: APIError, exc: BaseException) -> None:
    """Log one failed request with its id, and with the traceback for internal errors (500)."""
    if error.status_code == 500:
        logger.error(
            "request %s failed with 500: %s",
            request_id,
            error.message,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    elif error.status_code > 500:
        logger.warning("request %s failed with %d: %s", request_id, error.status_code, error.message)
    else:
        logger.info("request %s rejected with %d: %s", request_id, error.status_code, error.message)


def error_response(error: APIError) -> JSONResponse:
    """Build the JSON response of an error, with its headers (Retry-After for 429)."""
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI exception handler: log the error with the request id and send the error object."""
    error = to_api_error(exc)
    log_error(getattr(request.state, "request_id", "-"), error, exc)
    return error_response(error)


def check_engine_available(engine: EngineClient) -> None:
    """Raise a 503 APIError unless the engine is loaded and its thread is running."""
    if not engine.alive:
        raise APIError(
            503,
            "The engine thread stopped after an error. The server log has the cause. Restart the server.",
            type=SERVICE_UNAVAILABLE,
            code="engine_dead",
        )
    if not engine.ready:
        raise APIError(
            503,
            "The model is still loading. Retry when GET /health returns 200.",
            type=SERVICE_UNAVAILABLE,
            code="not_ready",
        )


# Type names that pydantic puts into an error location to tell union members apart.
_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _location_items(loc: tuple[int | str, ...]) -> list[int | str]:
    """Drop the `body` prefix and the union member names from a pydantic error location."""
    items: list[int | str] = []
    for item in loc:
        if isinstance(item, str) and (item in _UNION_MEMBER_NAMES or "[" in item or (item == "body" and not items)):
            continue
        items.append(item)
    return items


def format_location(loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into a parameter path like `messages[0].content[1].type`."""
    path = ""
    for item in _location_items(loc):
        if isinstance(item, int):
            path += f"[{item}]"
        else:
            path += f".{item}" if path else item
    return path


def _describe_input(value: Any) -> str | None:
    """Return a short form of a rejected input for a message, or None for lists, whose error states the length."""
    if isinstance(value, list):
        return None
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40] + "...")
    if isinstance(value, dict):
        return "a JSON object"
    return f"a value of type {type(value).__name__}"


def _join_reasons(reasons: list[str]) -> str:
    """Join pydantic messages of union members: "Input should be a valid string or a valid list"."""
    unique = list(dict.fromkeys(reasons))
    lead = "Input should be "
    if len(unique) > 1 and all(reason.startswith(lead) for reason in unique):
        return lead + " or ".join(reason[len(lead) :] for reason in unique)
    return " or ".join(unique)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """Build one 400 error from pydantic errors, naming the most specific failing field.

    A union such as `str | list[ContentPart]` reports one error per member. The error
    that goes deepest into the input is the one that matches what the client meant,
    and plain type mismatches of the other members are dropped. Only the first failing
    field is reported.
    """
    if not errors:
        return APIError(400, "Invalid request.")
    specific = [e for e in errors if not str(e.get("type", "")).endswith("_type")] or errors
    deepest = max(len(_location_items(tuple(e["loc"]))) for e in specific)
    deepest_errors = [e for e in specific if len(_location_items(tuple(e["loc"]))) == deepest]
    param = format_location(tuple(deepest_errors[0]["loc"])) or None
    chosen = [e for e in deepest_errors if (format_location(tuple(e["loc"])) or None) == param]
    name = param or "the request body"
    reasons = _join_reasons([str(e["msg"]) for e in chosen])

    first = chosen[0]
    if first.get("type") == "missing":
        message = f"Missing required parameter '{name}'."
    else:
        input_text = _describe_input(first.get("input"))
        message = f"Invalid value for '{name}': {reasons}" + (f", got {input_text}." if input_text else ".")
    return APIError(400, message, param=param, code="invalid_value")
