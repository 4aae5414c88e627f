"""End to end: a real `specvlm serve` process on loopback, driven by the official OpenAI client.

One server (the demo model in float32) serves the whole module. Every completion the
module receives is recorded in a `UsageLedger`, so that the metrics test can compare
the server's token counters with the sum of `usage`. The tests run in file order: the
disconnect test comes last, and it records the tokens of the request it aborts, for
which no usage is returned.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from skimage import data

from server_process import ServerProcess

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 1024
# Above every photo sent here (astronaut is 512x512 = 262144 pixels), below the oversized one.
MAX_IMAGE_PIXELS = 300_000
OVERSIZED_SIDE = 1024

QUESTION = "Describe the picture."
GREEDY_TOKENS = 24
SAMPLED_TOKENS = 16
SAMPLING_TEMPERATURE = 0.8
REQUEST_TIMEOUT_SECONDS = 120.0
METRICS_TIMEOUT_SECONDS = 20.0

PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": data.astronaut,
    "chelsea": data.chelsea,
    "coffee": data.coffee,
}


# ----- helpers ------------------------------------------------------------------------


class UsageLedger:
    """Token counts of every completion the server returned to this module, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.completions = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.completions += 1

    def add_unreported(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Record tokens of an aborted request, measured from the counters, since no usage came back."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens


@functools.cache
def image_bytes(name: str, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PHOTOS[name]()).save(buffer, format=image_format)
    return buffer.getvalue()


def data_url(payload: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(payload).decode()}"


def photo_url(name: str, image_format: str = "PNG") -> str:
    return data_url(image_bytes(name, image_format), f"image/{image_format.lower()}")


def image_messages(url: str, question: str = QUESTION) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def text_messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def chat(client: OpenAI, ledger: UsageLedger, **request: Any) -> ChatCompletion:
    """Send one non-streamed completion and record its usage before any check runs."""
    completion = client.chat.completions.create(**request)
    assert completion.usage is not None, "a non-streamed completion must carry usage"
    ledger.add(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    return completion


def stream_chat(client: OpenAI, ledger: UsageLedger, **request: Any) -> list[ChatCompletionChunk]:
    """Send one streamed completion with include_usage, read it to the end and record its usage."""
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request)
    chunks = list(stream)
    usage = chunks[-1].usage if chunks else None
    if usage is not None:
        ledger.add(usage.prompt_tokens, usage.completion_tokens)
    return chunks


def streamed_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def streamed_finish_reasons(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """Yield the data of each server-sent event, joining multi-line data as the SSE standard does."""
    data_lines: list[str] = []
    for line in lines:
        if line == "":
            if data_lines:
                yield "\n".join(data_lines)
            data_lines = []
        elif line.startswith("data:"):
            data_lines.append(line[len("data:") :].removeprefix(" "))
    if data_lines:
        yield "\n".join(data_lines)


def scrape_metrics(base_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Parse GET /metrics into {sample name: {sorted labels: value}}."""
    response = httpx.get(f"{base_url}/metrics", timeout=10.0)
    assert response.status_code == 200, response.text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def metric_total(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    assert name in samples, f"/metrics has no series {name}"
    return sum(samples[name].values())


# ----- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(demo_paths, tmp_path_factory) -> Iterator[ServerProcess]:
    """The demo model served on a free loopback port. `demo_paths` builds it first if needed."""
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    process = ServerProcess(
        [
            "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-image-pixels", str(MAX_IMAGE_PIXELS),
            # A fixed tree: the start-up tuning may switch an untrained draft off, and
            # these tests read the speculation counters.
            "--tree-total-tokens", "16",
        ],
        log_path,
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[OpenAI]:
    # No retries: a retried request would hide an error and count its tokens twice.
    openai_client = OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_SECONDS
    )
    yield openai_client
    openai_client.close()


@pytest.fixture(scope="module")
def ledger() -> UsageLedger:
    return UsageLedger()


@pytest.fixture(scope="module")
def model_id(client: OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


@pytest.fixture(scope="module")
def greedy_request(model_id: str) -> dict[str, Any]:
    return {
        "model": model_id,
        "messages": image_messages(photo_url("astronaut", "PNG")),
        "temperature": 0,
        "max_tokens": GREEDY_TOKENS,
    }


@pytest.fixture(scope="module")
def greedy_completion(client: OpenAI, ledger: UsageLedger, greedy_request: dict[str, Any]) -> ChatCompletion:
    return chat(client, ledger, **greedy_request)


def send_good_request(client: OpenAI, ledger: UsageLedger, model_id: str) -> None:
    completion = chat(client, ledger, model=model_id, messages=text_messages("Say hello."), temperature=0, max_tokens=2)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.completion_tokens >= 1


# ----- completions --------------------------------------------------------------------


def test_non_streamed_greedy_completion(greedy_completion: ChatCompletion, model_id: str):
    assert greedy_completion.object == "chat.completion"
    assert greedy_completion.id.startswith("chatcmpl-")
    assert greedy_completion.model == model_id
    assert len(greedy_completion.choices) == 1

    choice = greedy_completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content, "the content is empty"
    assert choice.finish_reason in ("stop", "length")

    usage = greedy_completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= GREEDY_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_equals_non_streamed(
    client: OpenAI, ledger: UsageLedger, greedy_request: dict[str, Any], greedy_completion: ChatCompletion
):
    chunks = stream_chat(client, ledger, **greedy_request)
    assert len(chunks) >= 3, f"expected role, finish and usage chunks, got {len(chunks)}"

    assert chunks[0].choices, "the first chunk has no choices"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)

    assert streamed_text(chunks) == greedy_completion.choices[0].message.content

    finish_reasons = streamed_finish_reasons(chunks)
    assert finish_reasons == [greedy_completion.choices[0].finish_reason]

    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage == greedy_completion.usage
    assert all(chunk.usage is None for chunk in chunks[:-1]), "only the last chunk may carry usage"


def test_raw_sse_ends_with_done(
    server: ServerProcess, ledger: UsageLedger, greedy_request: dict[str, Any], greedy_completion: ChatCompletion
):
    body = {**greedy_request, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT_SECONDS) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(response.iter_lines()))

    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    chunks = [json.loads(event) for event in events[:-1]]
    usage = chunks[-1]["usage"]
    ledger.add(usage["prompt_tokens"], usage["completion_tokens"])

    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert text == greedy_completion.choices[0].message.content
    assert chunks[-1]["choices"] == []


def pick_stop_string(text: str) -> str:
    """Return a six-character piece from the middle of `text` that is not only whitespace."""
    assert len(text) >= 20, f"the greedy completion is too short to cut: {text!r}"
    middle = len(text) // 2
    for start in range(middle, len(text) - 6):
        piece = text[start : start + 6]
        if piece.strip():
            return piece
    raise AssertionError(f"no stop string found in {text!r}")


def test_stop_string_cuts_completion(
    client: OpenAI, ledger: UsageLedger, greedy_request: dict[str, Any], greedy_completion: ChatCompletion
):
    full_text = greedy_completion.choices[0].message.content
    stop = pick_stop_string(full_text)
    expected = full_text[: full_text.index(stop)]

    completion = chat(client, ledger, **greedy_request, stop=stop)

    content = completion.choices[0].message.content
    assert content == expected, f"stop={stop!r}"
    assert stop not in content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens < greedy_completion.usage.completion_tokens


def test_stop_string_cuts_stream(
    client: OpenAI, ledger: UsageLedger, greedy_request: dict[str, Any], greedy_completion: ChatCompletion
):
    full_text = greedy_completion.choices[0].message.content
    stop = pick_stop_string(full_text)
    expected = full_text[: full_text.index(stop)]

    chunks = stream_chat(client, ledger, **greedy_request, stop=[stop])

    assert streamed_text(chunks) == expected, f"stop={stop!r}"
    finish_reasons = streamed_finish_reasons(chunks)
    assert finish_reasons == ["stop"]


def test_max_tokens_five_is_length(client: OpenAI, ledger: UsageLedger, model_id: str):
    messages = image_messages(photo_url("chelsea", "JPEG"))
    completion = chat(client, ledger, model=model_id, messages=messages, temperature=0, max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].message.content


def test_seeded_sampling_repeats(client: OpenAI, ledger: UsageLedger, model_id: str):
    request = {
        "model": model_id,
        "messages": image_messages(photo_url("coffee", "JPEG")),
        "temperature": SAMPLING_TEMPERATURE,
        "seed": 1234,
        "max_tokens": SAMPLED_TOKENS,
    }
    first = chat(client, ledger, **request)
    second = chat(client, ledger, **request)

    assert first.choices[0].message.content
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage == first.usage


def test_concurrent_greedy_matches_alone(
    client: OpenAI,
    ledger: UsageLedger,
    model_id: str,
    greedy_request: dict[str, Any],
    greedy_completion: ChatCompletion,
):
    cat_request = {
        "model": model_id,
        "messages": image_messages(photo_url("chelsea", "JPEG")),
        "temperature": 0,
        "max_tokens": GREEDY_TOKENS,
    }
    cat_alone = chat(client, ledger, **cat_request)

    def sampled(name: str, seed: int) -> dict[str, Any]:
        return {
            "model": model_id,
            "messages": image_messages(photo_url(name, "JPEG")),
            "temperature": SAMPLING_TEMPERATURE,
            "seed": seed,
            "max_tokens": GREEDY_TOKENS,
        }

    requests = [greedy_request, sampled("coffee", 7), cat_request, sampled("astronaut", 11)]
    barrier = threading.Barrier(len(requests))

    def send(request: dict[str, Any]) -> ChatCompletion:
        barrier.wait(timeout=30)
        return chat(client, ledger, **request)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(send, requests))

    astronaut_greedy, coffee_sampled, cat_greedy, astronaut_sampled = results
    assert astronaut_greedy.choices[0].message.content == greedy_completion.choices[0].message.content
    assert astronaut_greedy.usage == greedy_completion.usage
    assert cat_greedy.choices[0].message.content == cat_alone.choices[0].message.content
    assert cat_greedy.usage == cat_alone.usage
    for completion in (coffee_sampled, astronaut_sampled):
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.usage.completion_tokens >= 1


def test_metrics_match_usage(server: ServerProcess, client: OpenAI, ledger: UsageLedger, model_id: str):
    # One request of its own, so that speculation has run even when this test runs alone.
    chat(client, ledger, model=model_id, messages=text_messages("Count to ten."), temperature=0, max_tokens=4)

    samples = scrape_metrics(server.base_url)

    assert metric_total(samples, "specvlm_generation_tokens_total") == ledger.completion_tokens
    assert metric_total(samples, "specvlm_prompt_tokens_total") == ledger.prompt_tokens

    drafts = metric_total(samples, "specvlm_spec_decode_num_drafts_total")
    draft_tokens = metric_total(samples, "specvlm_spec_decode_num_draft_tokens_total")
    accepted = metric_total(samples, "specvlm_spec_decode_num_accepted_tokens_total")
    accepted_per_position = metric_total(samples, "specvlm_spec_decode_num_accepted_tokens_per_pos_total")
    assert drafts > 0
    assert draft_tokens >= drafts
    assert 0 <= accepted <= draft_tokens
    assert accepted_per_position == accepted

    finished = metric_total(samples, "specvlm_request_success_total")
    assert finished == ledger.completions

    for name, series in samples.items():
        if name.startswith("specvlm_"):
            for labels in series:
                assert ("model_name", model_id) in labels, f"{name}{dict(labels)} lacks model_name={model_id}"


# ----- rejected requests --------------------------------------------------------------


@dataclass(frozen=True)
class BadRequest:
    """One invalid request and the error that the server must return for it."""

    body: Callable[[str], bytes]  # model id -> raw request body
    status: int
    param: str | None
    code: str | None
    message_words: tuple[str, ...]  # each must appear in the error message, case-insensitive


def json_body(**fields: Any) -> Callable[[str], bytes]:
    """Build a body factory: a valid short request with `fields` replaced or added."""

    def build(model_id: str) -> bytes:
        body = {"model": model_id, "messages": text_messages("Say hello."), "max_tokens": 2, **fields}
        return json.dumps(body).encode()

    return build


def image_body(url_factory: Callable[[], str]) -> Callable[[str], bytes]:
    return lambda model_id: json_body(messages=image_messages(url_factory()))(model_id)


def truncated_png_url() -> str:
    png = image_bytes("astronaut", "PNG")
    return data_url(png[: len(png) // 2])


def oversized_photo_url() -> str:
    photo = Image.fromarray(data.astronaut()).resize((OVERSIZED_SIDE, OVERSIZED_SIDE))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    return data_url(buffer.getvalue(), "image/jpeg")


IMAGE_PARAM = "messages[0].content[0].image_url"

BAD_REQUESTS = {
    "malformed_json": BadRequest(
        lambda model_id: b'{"model": "' + model_id.encode() + b'", "messages": [',
        400, None, "invalid_json", ("malformed json",),
    ),
    "empty_messages": BadRequest(json_body(messages=[]), 400, "messages", None, ("messages",)),
    "unknown_model": BadRequest(
        json_body(model="no-such-model"), 404, "model", "model_not_found", ("no-such-model",)
    ),
    "invalid_base64": BadRequest(
        image_body(lambda: "data:image/png;base64,iVBORw0KGgo$$$not*base64"),
        400, IMAGE_PARAM, "invalid_image", ("base64",),
    ),
    "not_an_image": BadRequest(
        image_body(lambda: data_url(b"This is plain text, not a picture.\n" * 8)),
        400, IMAGE_PARAM, "invalid_image", ("not an image",),
    ),
    "truncated_png": BadRequest(image_body(truncated_png_url), 400, IMAGE_PARAM, "invalid_image", ("truncated",)),
    "image_over_pixel_limit": BadRequest(
        image_body(oversized_photo_url),
        413, IMAGE_PARAM, "image_too_large", (f"{OVERSIZED_SIDE}x{OVERSIZED_SIDE}", str(MAX_IMAGE_PIXELS)),
    ),
    "max_tokens_zero": BadRequest(json_body(max_tokens=0), 400, "max_tokens", None, ("max_tokens",)),
    "max_tokens_negative": BadRequest(json_body(max_tokens=-1), 400, "max_tokens", None, ("max_tokens",)),
    "max_tokens_over_context": BadRequest(
        json_body(max_tokens=MAX_MODEL_LEN + 1),
        400, "max_tokens", "context_length_exceeded", ("max_tokens", str(MAX_MODEL_LEN)),
    ),
    "negative_temperature": BadRequest(json_body(temperature=-0.5), 400, "temperature", None, ("temperature",)),
    "unknown_content_part": BadRequest(
        json_body(messages=[{"role": "user", "content": [{"type": "audio", "audio": "AAAA"}]}]),
        400, "messages[0].content[0].type", None, ("type", "audio"),
    ),
    "n_two": BadRequest(json_body(n=2), 400, "n", "unsupported_parameter", ("n",)),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_rejected(
    server: ServerProcess, client: OpenAI, ledger: UsageLedger, model_id: str, case: BadRequest
):
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=case.body(model_id),
        headers={"Content-Type": "application/json"},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )

    assert response.status_code == case.status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error"
    assert error["param"] == case.param, error
    if case.code is not None:
        assert error["code"] == case.code, error
    for word in case.message_words:
        assert word.lower() in error["message"].lower(), f"{word!r} missing from {error['message']!r}"

    send_good_request(client, ledger, model_id)


def test_openai_client_raises_typed_errors(client: OpenAI, model_id: str):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=text_messages("Hi."), max_tokens=2)
    assert not_found.value.status_code == 404
    assert not_found.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as bad_request:
        client.chat.completions.create(model=model_id, messages=text_messages("Hi."), max_tokens=2, n=2)
    assert bad_request.value.param == "n"


# ----- disconnect (keep last: it adds tokens that no usage reports) -------------------


def wait_for_abort(base_url: str, aborted_before: float) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Poll /metrics until the aborted counter rises and no request is running, then return that scrape."""
    deadline = time.monotonic() + METRICS_TIMEOUT_SECONDS
    while True:
        samples = scrape_metrics(base_url)
        aborted = metric_total(samples, "specvlm_num_aborted_requests_total")
        running = metric_total(samples, "specvlm_num_requests_running")
        if aborted > aborted_before and running == 0:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {METRICS_TIMEOUT_SECONDS:.0f} s: specvlm_num_aborted_requests_total={aborted} "
                f"(was {aborted_before}), specvlm_num_requests_running={running}"
            )
        time.sleep(0.2)


def test_disconnect_mid_stream_aborts(server: ServerProcess, client: OpenAI, ledger: UsageLedger, model_id: str):
    max_tokens = 200
    body = {
        "model": model_id,
        "messages": text_messages("Write a long story about a cat who learns to sail."),
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    before = scrape_metrics(server.base_url)

    content_chunks = 0
    with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT_SECONDS) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for event in sse_events(response.iter_lines()):
                assert event != "[DONE]", "the stream ended before the client left"
                chunk = json.loads(event)
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    content_chunks += 1
                if content_chunks >= 3:
                    break
    # Leaving both blocks closed the connection in the middle of the stream.

    after = wait_for_abort(server.base_url, metric_total(before, "specvlm_num_aborted_requests_total"))
    generated = metric_total(after, "specvlm_generation_tokens_total") - metric_total(
        before, "specvlm_generation_tokens_total"
    )
    prompted = metric_total(after, "specvlm_prompt_tokens_total") - metric_total(before, "specvlm_prompt_tokens_total")
    ledger.add_unreported(int(prompted), int(generated))
    assert 3 <= generated < max_tokens, "the aborted request should stop early"

    send_good_request(client, ledger, model_id)
    assert metric_total(scrape_metrics(server.base_url), "specvlm_generation_tokens_total") == ledger.completion_tokens
