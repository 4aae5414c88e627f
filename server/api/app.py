"""The FastAPI application: routes, error handlers and middleware, built by `create_app`.

Serve it with uvicorn, for example

    app = create_app(config, engine, metrics)
    uvicorn.run(app, host=config.host, port=config.port)

Routes: POST /v1/chat/completions (see `server.api.chat`), GET /v1/models,
GET /v1/models/{model}, GET /health, GET /metrics, GET /version and GET /openapi.json.
With `config.api_key` set, every route except /version needs `Authorization: Bearer
<key>`, and so do /health and /metrics when `health_requires_api_key` and
`metrics_requires_api_key` say so.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__
from server.api import chat
from server.api.errors import SERVICE_UNAVAILABLE, APIError, check_engine_available, handle_exception
from server.api.lifecycle import Lifecycle
from server.api.media import MediaPolicy
from server.api.middleware import RequestContextMiddleware
from server.api.openapi import build_openapi
from server.config import ServerConfig
from server.engine.types import EngineClient, EngineError, PromptError, QueueFullError
from server.metrics import Metrics

info_router = APIRouter()


def create_app(config: ServerConfig, engine: EngineClient, metrics: Metrics) -> FastAPI:
    """Build the HTTP app around a running (or still loading) engine.

    The engine records the metrics; the app only exposes `metrics.registry` on /metrics.
    `app.state.lifecycle` is the shutdown state that `specvlm serve` drives on SIGTERM.
    """
    app = FastAPI(title="specvlm", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    app.state.config = config
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.media_policy = MediaPolicy.from_config(config)
    app.state.lifecycle = Lifecycle(config.shutdown_grace_seconds)
    app.state.created = int(time.time())

    app.include_router(chat.router)
    app.include_router(info_router)
    for exc_class in (APIError, RequestValidationError, StarletteHTTPException, PromptError, QueueFullError, EngineError):
        app.add_exception_handler(exc_class, handle_exception)
    app.add_middleware(RequestContextMiddleware, config=config, lifecycle=app.state.lifecycle)
    return app


def _model_card(request: Request) -> dict[str, Any]:
    engine: EngineClient = request.app.state.engine
    return {
        "id": engine.model_name,
        "object": "model",
        "created": request.app.state.created,
        "owned_by": "specvlm",
        "description": engine.model_description,
        "max_model_len": engine.max_model_len,
    }


@info_router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@info_router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    chat.check_model(model, request.app.state.engine.model_name)
    return _model_card(request)


@info_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Return 200 when the engine is loaded and running, else 503 with the reason.

    The 503 is returned, not raised, so that polling during loading or shutdown leaves
    no error logs.
    """
    try:
        check_engine_available(request.app.state.engine)
        if request.app.state.lifecycle.draining:
            raise APIError(
                503,
                "The server is shutting down.",
                type=SERVICE_UNAVAILABLE,
                code="server_shutting_down",
            )
    except APIError as error:
        return JSONResponse(error.to_dict(), status_code=error.status_code)
    return JSONResponse({"status": "ok"})


@info_router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Return the Prometheus text exposition (format 0.0.4) of the server's registry."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)


@info_router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}
