"""Schema-driven fuzzing of the HTTP API with schemathesis, in-process against the scripted engine.

schemathesis reads /openapi.json from the ASGI app and generates requests for every
operation. Each response must not be a 5xx, and its status, content type and body must
match the document. The run is bounded and derandomized, so every run sends the same
requests. No media host or local folder is allowed, so a generated image URL is
rejected before any name resolution or file access.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fake_engine import FakeEngine
from server.api.app import create_app
from server.config import ServerConfig
from server.metrics import Metrics

# Examples per API operation. This file, with seven operations at this count, took
# about 10 s on a shared 2-core CPU machine.
MAX_EXAMPLES = 40

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def build_app():
    engine = FakeEngine()
    config = ServerConfig(
        api_key=None, max_body_bytes=256 * 1024, max_image_pixels=256 * 256, max_images_per_request=2
    )
    return create_app(config, engine, Metrics(engine.model_name))


schema = schemathesis.openapi.from_asgi("/openapi.json", build_app())


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


def test_schema_documents_chat_body() -> None:
    document = build_app().openapi()

    operation = document["paths"]["/v1/chat/completions"]["post"]
    reference = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert reference == "#/components/schemas/ChatCompletionRequest"
    assert "messages" in document["components"]["schemas"]["ChatCompletionRequest"]["required"]
    for status in ("400", "401", "413", "429", "503"):
        assert status in operation["responses"], status


@pytest.mark.parametrize("path", ["/health", "/metrics", "/version", "/v1/models"])
def test_schema_lists_info_routes(path: str) -> None:
    assert path in build_app().openapi()["paths"]
