"""HTTP API tests against a scripted engine: response shapes, streaming, errors, auth, aborts."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fake_engine import DEFAULT_SCRIPT, VISUAL_TOKENS_PER_IMAGE, FakeEngine
from server import __version__
from server.api.app import create_app
from server.config import ServerConfig
from server.engine.types import PromptError
from server.metrics import Metrics

URL = "/v1/chat/completions"
FULL_TEXT = "".join(DEFAULT_SCRIPT)


def chat_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "fake-vlm", "messages": [{"role": "user", "content": "Describe the picture."}]}
    body.update(fields)
    return body


def image_message(url: str, text: str = "What is this?") -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
    }


def png_data_url(width: int = 8, height: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def sse_events(response: httpx.Response) -> list[Any]:
    """Parse an SSE body into JSON objects, with the final `[DONE]` kept as the string."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def assert_still_serves(client: TestClient) -> None:
    response = client.post(URL, json=chat_body())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == FULL_TEXT


# Shapes


def test_completion_non_streaming_shape(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(URL, json=chat_body(max_tokens=10))

    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "fake-vlm"
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": FULL_TEXT}
    assert choice["finish_reason"] == "stop"
    prompt_tokens = len(engine.submitted[0].prompt.token_ids)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(DEFAULT_SCRIPT),
        "total_tokens": prompt_tokens + len(DEFAULT_SCRIPT),
    }
    assert engine.aborted == []


def test_completion_streaming_shape(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(URL, json=chat_body(stream=True, stream_options={"include_usage": True}))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert len({chunk["created"] for chunk in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)

    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finish_chunk, usage_chunk = chunks[-2], chunks[-1]
    assert finish_chunk["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(DEFAULT_SCRIPT)
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + len(DEFAULT_SCRIPT)
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    content_chunks = chunks[1:-2]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in content_chunks)
    assert engine.aborted == []


def test_streamed_deltas_equal_non_streamed_text(client: TestClient) -> None:
    streamed = sse_events(client.post(URL, json=chat_body(stream=True)))
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in streamed[:-1])

    non_streamed = client.post(URL, json=chat_body()).json()

    assert text == non_streamed["choices"][0]["message"]["content"]
    assert text == FULL_TEXT


def test_streaming_without_usage_has_no_usage_chunk(client: TestClient) -> None:
    events = sse_events(client.post(URL, json=chat_body(stream=True)))

    assert events[-1] == "[DONE]"
    assert all(chunk["choices"] for chunk in events[:-1])
    assert all("usage" not in chunk for chunk in events[:-1])


def test_max_tokens_limits_output_and_sets_length(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(URL, json=chat_body(max_tokens=2)).json()

    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "".join(DEFAULT_SCRIPT[:2])
    assert body["usage"]["completion_tokens"] == 2
    assert engine.submitted[0].params.max_tokens == 2


def test_max_completion_tokens_wins_over_max_tokens(client: TestClient, engine: FakeEngine) -> None:
    client.post(URL, json=chat_body(max_tokens=5, max_completion_tokens=3))

    assert engine.submitted[0].params.max_tokens == 3


def test_missing_max_tokens_uses_context_left(client: TestClient, engine: FakeEngine) -> None:
    client.post(URL, json=chat_body())

    prompt_tokens = len(engine.submitted[0].prompt.token_ids)
    assert engine.submitted[0].params.max_tokens == engine.max_model_len - prompt_tokens


def test_sampling_params_reach_engine(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(
        URL, json=chat_body(temperature=0, top_p=0.5, top_k=-1, seed=7, stop=["\n", "END"], user="someone")
    )

    assert response.status_code == 200
    params = engine.submitted[0].params
    assert params.temperature == 0.0
    assert params.greedy
    assert params.top_p == 0.5
    assert params.top_k == 0
    assert params.seed == 7
    assert params.stop == ["\n", "END"]


def test_sampling_defaults(client: TestClient, engine: FakeEngine) -> None:
    client.post(URL, json=chat_body(stop="END", top_k=5))

    params = engine.submitted[0].params
    assert params.temperature == 1.0
    assert params.top_p == 1.0
    assert params.top_k == 5
    assert params.seed is None
    assert params.stop == ["END"]


def test_missing_model_field_is_accepted(client: TestClient) -> None:
    body = chat_body()
    del body["model"]

    response = client.post(URL, json=body)

    assert response.status_code == 200


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    response = client.post(URL, json=chat_body(some_future_field={"x": 1}, n=1, logprobs=False, tool_choice="none"))

    assert response.status_code == 200


def test_image_part_reaches_prepare_as_pil(client: TestClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        image_message(png_data_url(12, 10)),
    ]

    response = client.post(URL, json=chat_body(messages=messages))

    assert response.status_code == 200
    system, user = engine.prepared[0]
    assert system == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    image = user["content"][1]["image"]
    assert user["content"][1]["type"] == "image"
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (12, 10)
    assert engine.submitted[0].prompt.num_visual_tokens == VISUAL_TOKENS_PER_IMAGE


def test_string_content_stays_string(client: TestClient, engine: FakeEngine) -> None:
    client.post(URL, json=chat_body())

    assert engine.prepared[0] == [{"role": "user", "content": "Describe the picture."}]


def test_request_id_echoed_or_generated(client: TestClient, engine: FakeEngine) -> None:
    echoed = client.post(URL, json=chat_body(), headers={"X-Request-Id": "client-id-1"})
    generated = client.post(URL, json=chat_body())
    rejected = client.post(URL, json={}, headers={"X-Request-Id": "bad id\twith spaces"})

    assert echoed.headers["x-request-id"] == "client-id-1"
    assert len(generated.headers["x-request-id"]) == 32
    assert rejected.headers["x-request-id"] != "bad id\twith spaces"
    assert len(rejected.headers["x-request-id"]) == 32
    assert engine.submitted[0].request_id != engine.submitted[1].request_id


def test_finish_is_logged_with_request_id(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="server.api"):
        client.post(URL, json=chat_body(), headers={"X-Request-Id": "log-me"})

    finished = [r.getMessage() for r in caplog.records if "finished" in r.getMessage()]
    assert len(finished) == 1
    assert "log-me" in finished[0]
    assert f"completion_tokens={len(DEFAULT_SCRIPT)}" in finished[0]
    assert "finish_reason=stop" in finished[0]


# Bad input: each gives its 4xx with an error object, and the next request still works.


def test_malformed_json_rejected(client: TestClient) -> None:
    response = client.post(URL, content=b'{"messages": [', headers={"Content-Type": "application/json"})

    error = assert_error(response, 400, code="invalid_json")
    assert "Malformed JSON" in error["message"]
    assert_still_serves(client)


def test_json_without_content_type_accepted(client: TestClient) -> None:
    response = client.post(URL, content=json.dumps(chat_body()).encode())

    assert response.status_code == 200


def test_body_not_an_object_rejected(client: TestClient) -> None:
    response = client.post(URL, json=[1, 2])

    assert_error(response, 400, code="invalid_json")


def test_empty_messages_rejected(client: TestClient) -> None:
    error = assert_error(client.post(URL, json=chat_body(messages=[])), 400, param="messages")

    assert "at least 1" in error["message"]
    assert_still_serves(client)


def test_missing_messages_rejected(client: TestClient) -> None:
    error = assert_error(client.post(URL, json={"model": "fake-vlm"}), 400, param="messages")

    assert "Missing" in error["message"]


def test_unknown_model_is_404(client: TestClient) -> None:
    error = assert_error(client.post(URL, json=chat_body(model="gpt-9")), 404, param="model", code="model_not_found")

    assert "gpt-9" in error["message"]
    assert "fake-vlm" in error["message"]
    assert_still_serves(client)


def test_invalid_base64_rejected(client: TestClient) -> None:
    messages = [image_message("data:image/png;base64,@@@not*base64@@@")]

    error = assert_error(
        client.post(URL, json=chat_body(messages=messages)), 400, param="messages[0].content[1].image_url"
    )

    assert "base64" in error["message"]
    assert_still_serves(client)


def test_bytes_not_an_image_rejected(client: TestClient) -> None:
    url = "data:image/png;base64," + base64.b64encode(b"these bytes are plain text, not a PNG").decode()

    error = assert_error(
        client.post(URL, json=chat_body(messages=[image_message(url)])), 400, param="messages[0].content[1].image_url"
    )

    assert "not an image" in error["message"]
    assert_still_serves(client)


def test_truncated_png_rejected(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    url = "data:image/png;base64," + base64.b64encode(truncated).decode()

    error = assert_error(
        client.post(URL, json=chat_body(messages=[image_message(url)])), 400, param="messages[0].content[1].image_url"
    )

    assert "truncated" in error["message"]
    assert_still_serves(client)


def test_image_over_pixel_limit_is_413(client: TestClient, config: ServerConfig) -> None:
    messages = [image_message(png_data_url(300, 300))]

    error = assert_error(client.post(URL, json=chat_body(messages=messages)), 413, code="image_too_large")

    assert "300x300" in error["message"]
    assert str(config.max_image_pixels) in error["message"]
    assert "max-image-pixels" in error["message"]
    assert_still_serves(client)


def test_image_at_pixel_limit_accepted(client: TestClient) -> None:
    response = client.post(URL, json=chat_body(messages=[image_message(png_data_url(256, 256))]))

    assert response.status_code == 200


def test_http_image_url_of_unlisted_host_rejected(client: TestClient) -> None:
    # No host is allowed by default, so this is rejected before any name resolution.
    messages = [image_message("https://example.com/cat.png")]

    error = assert_error(
        client.post(URL, json=chat_body(messages=messages)),
        400,
        param="messages[0].content[1].image_url",
        code="image_url_not_allowed",
    )

    assert "--allowed-media-domains" in error["message"]


def test_too_many_images_rejected(client: TestClient, config: ServerConfig) -> None:
    url = png_data_url()
    content = [{"type": "image_url", "image_url": {"url": url}} for _ in range(config.max_images_per_request + 1)]

    error = assert_error(
        client.post(URL, json=chat_body(messages=[{"role": "user", "content": content}])),
        400,
        code="too_many_images",
    )

    assert "max-images-per-request" in error["message"]


def test_image_in_assistant_message_rejected(client: TestClient) -> None:
    message = image_message(png_data_url())
    message["role"] = "assistant"

    assert_error(client.post(URL, json=chat_body(messages=[message])), 400, param="messages[0].content[1]")


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_below_one_rejected(client: TestClient, value: int) -> None:
    error = assert_error(client.post(URL, json=chat_body(max_tokens=value)), 400, param="max_tokens")

    assert str(value) in error["message"]
    assert_still_serves(client)


def test_max_tokens_beyond_context_rejected(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(URL, json=chat_body(max_tokens=engine.max_model_len))

    error = assert_error(response, 400, param="max_tokens", code="context_length_exceeded")
    assert str(engine.max_model_len) in error["message"]
    assert_still_serves(client)


def test_max_tokens_filling_context_accepted(client: TestClient, engine: FakeEngine) -> None:
    prompt_tokens = len("Describe the picture.".split())

    response = client.post(URL, json=chat_body(max_tokens=engine.max_model_len - prompt_tokens))

    assert response.status_code == 200


def test_prompt_filling_context_rejected(client: TestClient, engine: FakeEngine) -> None:
    long_text = " ".join(["word"] * engine.max_model_len)

    response = client.post(URL, json=chat_body(messages=[{"role": "user", "content": long_text}]))

    assert_error(response, 400, param="messages", code="context_length_exceeded")


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.5), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5), ("top_k", -2)],
)
def test_sampling_value_out_of_range_rejected(client: TestClient, field: str, value: float) -> None:
    error = assert_error(client.post(URL, json=chat_body(**{field: value})), 400, param=field)

    assert str(value) in error["message"]
    assert_still_serves(client)


def test_unknown_content_part_type_rejected(client: TestClient) -> None:
    message = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}

    error = assert_error(client.post(URL, json=chat_body(messages=[message])), 400, param="messages[0].content[0].type")

    assert "input_audio" in error["message"]
    assert_still_serves(client)


def test_unknown_role_rejected(client: TestClient) -> None:
    response = client.post(URL, json=chat_body(messages=[{"role": "tool", "content": "42"}]))

    assert_error(response, 400, param="messages[0].role")


def test_text_part_without_text_rejected(client: TestClient) -> None:
    message = {"role": "user", "content": [{"type": "text"}]}

    assert_error(client.post(URL, json=chat_body(messages=[message])), 400, param="messages[0].content[0].text")


def test_n_above_one_rejected(client: TestClient) -> None:
    error = assert_error(client.post(URL, json=chat_body(n=2)), 400, param="n", code="unsupported_parameter")

    assert "n=1" in error["message"]
    assert_still_serves(client)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -0.5),
        ("logit_bias", {"42": 10}),
        ("functions", [{"name": "f"}]),
    ],
)
def test_unsupported_parameter_rejected(client: TestClient, field: str, value: Any) -> None:
    error = assert_error(client.post(URL, json=chat_body(**{field: value})), 400, param=field)

    assert field in error["message"]
    assert_still_serves(client)


def test_too_many_stop_sequences_rejected(client: TestClient) -> None:
    error = assert_error(
        client.post(URL, json=chat_body(stop=["a", "b", "c", "d", "e"])), 400, param="stop", code="too_many_stop_sequences"
    )

    assert "maximum of 4" in error["message"]
    assert "--max-stop-sequences" in error["message"]


def test_stop_sequence_limits_follow_config(engine: FakeEngine, metrics: Metrics) -> None:
    config = ServerConfig(api_key=None, max_stop_sequences=6, max_stop_sequence_length=3)
    client = TestClient(create_app(config, engine, metrics))

    assert client.post(URL, json=chat_body(stop=["a", "b", "c", "d", "e", "f"])).status_code == 200
    error = assert_error(
        client.post(URL, json=chat_body(stop=["abc", "abcd"])), 400, param="stop[1]", code="stop_sequence_too_long"
    )
    assert "--max-stop-sequence-length" in error["message"]


def test_empty_stop_sequence_rejected(client: TestClient) -> None:
    assert_error(client.post(URL, json=chat_body(stop=["a", ""])), 400, param="stop[1]")


def test_stream_options_without_stream_rejected(client: TestClient) -> None:
    response = client.post(URL, json=chat_body(stream_options={"include_usage": True}))

    assert_error(response, 400, param="stream_options")


def test_prompt_error_from_engine_is_400(client: TestClient, engine: FakeEngine) -> None:
    engine.prompt_error = PromptError("The model accepts one image per request.", param="messages", code="too_many_images")

    assert_error(client.post(URL, json=chat_body()), 400, param="messages", code="too_many_images")


def test_body_over_limit_is_413(client: TestClient, config: ServerConfig) -> None:
    padding = "x" * config.max_body_bytes
    response = client.post(URL, json=chat_body(messages=[{"role": "user", "content": padding}]))

    error = assert_error(response, 413, code="request_too_large")
    assert "max-body-bytes" in error["message"]
    assert_still_serves(client)


def test_data_url_over_image_byte_limit_is_413(engine: FakeEngine, metrics: Metrics) -> None:
    url = png_data_url(64, 64)
    decoded_size = len(base64.b64decode(url.split(",", 1)[1]))
    config = ServerConfig(api_key=None, max_image_bytes=decoded_size - 1)
    client = TestClient(create_app(config, engine, metrics))

    response = client.post(URL, json=chat_body(messages=[image_message(url)]))

    error = assert_error(response, 413, param="messages[0].content[1].image_url", code="image_too_large")
    assert f"limit of {decoded_size - 1} bytes" in error["message"]
    assert "--max-image-bytes" in error["message"]
    assert engine.prepared == []


def test_data_url_at_image_byte_limit_accepted(engine: FakeEngine, metrics: Metrics) -> None:
    url = png_data_url(64, 64)
    config = ServerConfig(api_key=None, max_image_bytes=len(base64.b64decode(url.split(",", 1)[1])))
    client = TestClient(create_app(config, engine, metrics))

    assert client.post(URL, json=chat_body(messages=[image_message(url)])).status_code == 200


# Engine state and failures


def test_queue_full_is_429_with_retry_after(client: TestClient, engine: FakeEngine) -> None:
    engine.queue_full = True

    response = client.post(URL, json=chat_body())

    assert_error(response, 429, code="queue_full")
    assert int(response.headers["retry-after"]) >= 1
    engine.queue_full = False
    assert_still_serves(client)


def test_not_ready_is_503(client: TestClient, engine: FakeEngine) -> None:
    engine.is_ready = False

    assert_error(client.post(URL, json=chat_body()), 503, code="not_ready")
    assert_error(client.get("/health"), 503, code="not_ready")
    engine.is_ready = True
    assert client.get("/health").json() == {"status": "ok"}
    assert_still_serves(client)


def test_dead_engine_is_503(client: TestClient, engine: FakeEngine) -> None:
    engine.is_alive = False

    assert_error(client.post(URL, json=chat_body()), 503, code="engine_dead")
    assert_error(client.get("/health"), 503, code="engine_dead")


def test_engine_error_non_streaming_is_500(client: TestClient, engine: FakeEngine) -> None:
    engine.error_after = 2

    error = assert_error(client.post(URL, json=chat_body()), 500, code="engine_error")

    assert error["message"] == "The engine failed on purpose."


def test_engine_error_after_stream_started_is_error_event(client: TestClient, engine: FakeEngine) -> None:
    engine.error_after = 2

    response = client.post(URL, json=chat_body(stream=True))

    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["message"] == "The engine failed on purpose."
    text = "".join(event["choices"][0]["delta"].get("content", "") for event in events[:-2])
    assert text == "".join(DEFAULT_SCRIPT[:2])


def test_unexpected_exception_is_sanitised_500(
    client: TestClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.prepare_exception = RuntimeError("secret internal detail")

    with caplog.at_level("ERROR"):
        response = client.post(URL, json=chat_body(), headers={"X-Request-Id": "trace-me"})

    error = assert_error(response, 500)
    assert "secret" not in error["message"]
    assert response.headers["x-request-id"] == "trace-me"
    logged = [r for r in caplog.records if "trace-me" in r.getMessage()]
    assert logged
    assert logged[0].exc_info is not None
    engine.prepare_exception = None
    assert_still_serves(client)


def test_unknown_route_is_404_error_object(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404)


# Auth


@pytest.fixture
def auth_client(engine: FakeEngine, metrics: Metrics) -> TestClient:
    return TestClient(create_app(ServerConfig(api_key="sesame"), engine, metrics))


def test_wrong_api_key_is_401(auth_client: TestClient) -> None:
    response = auth_client.post(URL, json=chat_body(), headers={"Authorization": "Bearer wrong"})

    error = assert_error(response, 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "sesame" not in response.text


@pytest.mark.parametrize("authorization", ["sesame", "Basic sesame", "Bearer sesame2", "Bearer  sesamE"])
def test_malformed_authorization_is_401(auth_client: TestClient, authorization: str) -> None:
    response = auth_client.post(URL, json=chat_body(), headers={"Authorization": authorization})

    assert_error(response, 401, code="invalid_api_key")


def test_missing_api_key_is_401(auth_client: TestClient) -> None:
    response = auth_client.post(URL, json=chat_body())

    assert_error(response, 401, code="missing_api_key")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_error(auth_client.get("/v1/models"), 401)
    assert_error(auth_client.get("/v1/models/fake-vlm"), 401)
    assert_error(auth_client.get("/openapi.json"), 401)
    assert_error(auth_client.get("/v1/unknown"), 401)


def test_right_api_key_is_accepted(auth_client: TestClient) -> None:
    response = auth_client.post(URL, json=chat_body(), headers={"Authorization": "Bearer sesame"})

    assert response.status_code == 200


def test_auth_checked_before_body(auth_client: TestClient) -> None:
    response = auth_client.post(URL, content=b"{not json", headers={"Authorization": "Bearer wrong"})

    assert_error(response, 401)


@pytest.mark.parametrize("path", ["/health", "/metrics", "/version"])
def test_open_paths_need_no_api_key(auth_client: TestClient, path: str) -> None:
    assert auth_client.get(path).status_code == 200


@pytest.mark.parametrize(
    ("setting", "path"), [("health_requires_api_key", "/health"), ("metrics_requires_api_key", "/metrics")]
)
def test_monitoring_path_can_require_api_key(engine: FakeEngine, metrics: Metrics, setting: str, path: str) -> None:
    config = ServerConfig(api_key="sesame", **{setting: True})
    client = TestClient(create_app(config, engine, metrics))

    assert_error(client.get(path), 401, code="missing_api_key")
    assert client.get(path, headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert client.get("/version").status_code == 200


def test_empty_api_key_setting_rejected() -> None:
    with pytest.raises(ValueError, match="api_key"):
        ServerConfig(api_key="")


# Other routes


def test_models_lists_served_model(client: TestClient, engine: FakeEngine) -> None:
    body = client.get("/v1/models").json()

    assert body["object"] == "list"
    assert len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == engine.model_name
    assert card["owned_by"] == "specvlm"
    assert card["description"] == engine.model_description


def test_model_retrieve(client: TestClient) -> None:
    assert client.get("/v1/models/fake-vlm").json()["id"] == "fake-vlm"
    assert_error(client.get("/v1/models/other"), 404, code="model_not_found")


def test_version(client: TestClient) -> None:
    assert client.get("/version").json() == {"version": __version__}


def test_metrics_endpoint_exposes_registry(client: TestClient, metrics: Metrics) -> None:
    metrics.on_tokens(3, 0.0)

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    samples = families["specvlm_generation_tokens"].samples
    assert [s.value for s in samples if s.name == "specvlm_generation_tokens_total"] == [3.0]


# Client disconnects, driven through raw ASGI calls so that the disconnect can be timed.


def run_and_disconnect(app: Any, body: dict[str, Any], disconnect_when: Any) -> list[dict[str, Any]]:
    """Call the ASGI app with `body`; the client disconnects once `disconnect_when(sent)` is true."""
    sent: list[dict[str, Any]] = []

    async def scenario() -> None:
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def watch() -> None:
            while not disconnect_when(sent):
                await asyncio.sleep(0.001)
            disconnected.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": URL,
            "raw_path": URL.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(app(scope, receive, send), timeout=10)
        watcher.cancel()

    asyncio.run(scenario())
    return sent


def test_stream_disconnect_aborts_engine_request(config: ServerConfig, engine: FakeEngine, metrics: Metrics) -> None:
    engine.never_finish = True
    app = create_app(config, engine, metrics)

    def after_two_chunks(sent: list[dict[str, Any]]) -> bool:
        return sum(1 for message in sent if message["type"] == "http.response.body") >= 2

    run_and_disconnect(app, chat_body(stream=True), after_two_chunks)

    assert len(engine.submitted) == 1
    assert engine.aborted == [engine.submitted[0].request_id]


def test_non_streaming_disconnect_aborts_engine_request(
    config: ServerConfig, engine: FakeEngine, metrics: Metrics
) -> None:
    engine.never_finish = True
    app = create_app(config, engine, metrics)

    run_and_disconnect(app, chat_body(), lambda sent: bool(engine.submitted))

    assert len(engine.submitted) == 1
    assert engine.aborted == [engine.submitted[0].request_id]


def test_finished_stream_is_not_aborted(config: ServerConfig, engine: FakeEngine, metrics: Metrics) -> None:
    app = create_app(config, engine, metrics)

    sent = run_and_disconnect(app, chat_body(stream=True), lambda sent: False if not sent else sent[-1].get("more_body") is False)

    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    assert body.endswith(b"data: [DONE]\n\n")
    assert engine.aborted == []


# Through the official client, over the ASGI transport.


def test_openai_client_round_trip(config: ServerConfig, engine: FakeEngine, metrics: Metrics) -> None:
    openai = pytest.importorskip("openai")
    app = create_app(config, engine, metrics)

    async def scenario() -> tuple[str, str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http_client:
            client = openai.AsyncOpenAI(api_key="unused", base_url="http://127.0.0.1/v1", http_client=http_client)
            completion = await client.chat.completions.create(
                model="fake-vlm", messages=[{"role": "user", "content": "Hi"}], max_tokens=10
            )
            stream = await client.chat.completions.create(
                model="fake-vlm", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
            return completion.choices[0].message.content, "".join(pieces)

    non_streamed, streamed = asyncio.run(scenario())

    assert non_streamed == FULL_TEXT
    assert streamed == FULL_TEXT
