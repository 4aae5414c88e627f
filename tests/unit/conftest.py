"""Fixtures for the HTTP API tests: a scripted engine, fresh metrics and a test client."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fake_engine import FakeEngine
from server.api.app import create_app
from server.config import ServerConfig
from server.metrics import Metrics

MAX_IMAGE_PIXELS = 256 * 256


@pytest.fixture
def config() -> ServerConfig:
    # api_key is set explicitly so that a SPECVLM_API_KEY in the environment cannot leak in.
    return ServerConfig(
        api_key=None, max_image_pixels=MAX_IMAGE_PIXELS, max_images_per_request=2, max_body_bytes=1024 * 1024
    )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def metrics(engine: FakeEngine) -> Metrics:
    return Metrics(engine.model_name)


@pytest.fixture
def client(config: ServerConfig, engine: FakeEngine, metrics: Metrics) -> Iterator[TestClient]:
    with TestClient(create_app(config, engine, metrics)) as test_client:
        yield test_client


def encode_data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_bytes(image: Image.Image, image_format: str = "PNG", **save_options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


@pytest.fixture
def make_data_url() -> Callable[..., str]:
    """Return a function that saves a PIL image in a format and returns its data URL."""

    def make(image: Image.Image, image_format: str = "PNG", **save_options: object) -> str:
        media_type = "image/" + image_format.lower()
        return encode_data_url(image_bytes(image, image_format, **save_options), media_type)

    return make
