"""The OpenAPI document served at /openapi.json.

The chat route reads its body itself (to parse JSON off the event loop and to shape
its 400 errors), so FastAPI cannot see the body model. This module adds it, documents
the OpenAI error object for every error status a route returns, and sets the media
types of the streamed and plain-text responses.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.api.protocol import ChatCompletionRequest

CHAT_PATH = "/v1/chat/completions"
SCHEMA_PREFIX = "#/components/schemas/"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

ERROR_DESCRIPTIONS = {
    "400": "Invalid request",
    "401": "Missing or invalid API key",
    "404": "Unknown model or path",
    "405": "Method not allowed",
    "413": "Request body or image too large",
    "429": "Request queue full",
    "500": "Internal error",
    "503": "Model loading, engine stopped, or server shutting down",
}

# Error statuses per path, besides 401 (any route when an API key is set) and 503
# (any route while the server shuts down).
ROUTE_ERRORS = {
    CHAT_PATH: ("400", "404", "413", "429", "500"),
    "/v1/models/{model}": ("404",),
}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """Return the app's OpenAPI document, built on first call and cached on the app."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ERROR_SCHEMA

    body_schema = ChatCompletionRequest.model_json_schema(ref_template=SCHEMA_PREFIX + "{model}")
    schemas.update(body_schema.pop("$defs", {}))
    schemas["ChatCompletionRequest"] = body_schema
    chat = document["paths"][CHAT_PATH]["post"]
    chat["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": SCHEMA_PREFIX + "ChatCompletionRequest"}}},
    }
    # One server-sent event: its `data` is a JSON chunk, a JSON error object or "[DONE]".
    chat["responses"]["200"]["content"]["text/event-stream"] = {
        "schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    }

    metrics = document["paths"]["/metrics"]["get"]
    metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}

    for path, operations in document["paths"].items():
        for operation in operations.values():
            operation["responses"].pop("422", None)  # validation errors get a 400
            for status in ("401", "503", *ROUTE_ERRORS.get(path, ())):
                operation["responses"][status] = {
                    "description": ERROR_DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": {"$ref": SCHEMA_PREFIX + "ErrorResponse"}}},
                }
    app.openapi_schema = document
    return document
