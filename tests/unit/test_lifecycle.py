"""Shutdown and engine failure as clients see them: 503 while draining, aborts at the end
of the grace period, and streams that end with an error event and [DONE], never a hang.

The drain tests drive `Lifecycle.drain` in-process with the scripted engine. The engine
failure test runs the real engine on the tiny checkpoint and kills its thread mid-stream.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from fake_engine import DEFAULT_SCRIPT, FakeEngine
from server.api.app import create_app
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.types import EngineError, SamplingParams
from server.metrics import Metrics
from tiny_models import build_tiny_checkpoint

URL = "/v1/chat/completions"
FULL_TEXT = "".join(DEFAULT_SCRIPT)
# Bounds every await here, so that a hang fails the test instead of stalling the run.
HANG_TIMEOUT_SECONDS = 20


def chat_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Describe the picture."}]}
    body.update(fields)
    return body


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def make_app(engine: Any, grace_seconds: float = 30.0) -> Any:
    config = ServerConfig(api_key=None, shutdown_grace_seconds=grace_seconds)
    return create_app(config, engine, Metrics(engine.model_name))


def run(scenario: Any) -> Any:
    return asyncio.run(asyncio.wait_for(scenario, HANG_TIMEOUT_SECONDS))


async def wait_until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.005)


# Draining


def test_draining_rejects_new_requests_with_503() -> None:
    engine = FakeEngine()
    app = make_app(engine)
    app.state.lifecycle.begin_drain()

    async def scenario() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return {
                "chat": await client.post(URL, json=chat_body()),
                "models": await client.get("/v1/models"),
                "health": await client.get("/health"),
                "metrics": await client.get("/metrics"),
            }

    responses = run(scenario())

    for name in ("chat", "models", "health"):
        assert responses[name].status_code == 503, name
        assert responses[name].json()["error"]["code"] == "server_shutting_down", name
    assert responses["metrics"].status_code == 200
    assert engine.submitted == []


def test_drain_without_requests_finishes_at_once() -> None:
    app = make_app(FakeEngine())

    assert run(app.state.lifecycle.drain()) is True
    assert app.state.lifecycle.aborting is False


def test_running_request_finishes_within_grace() -> None:
    engine = FakeEngine()
    app = make_app(engine)
    lifecycle = app.state.lifecycle

    async def scenario() -> tuple[httpx.Response, httpx.Response, bool]:
        engine.finish_gate = asyncio.Event()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            running = asyncio.create_task(client.post(URL, json=chat_body(stream=True)))
            await wait_until(lambda: engine.submitted)
            drain = asyncio.create_task(lifecycle.drain())
            await wait_until(lambda: lifecycle.draining)
            rejected = await client.post(URL, json=chat_body())
            engine.finish_gate.set()
            return await running, rejected, await drain

    finished, rejected, all_finished = run(scenario())

    assert rejected.status_code == 503
    assert finished.status_code == 200
    events = sse_events(finished.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == FULL_TEXT
    assert all_finished is True
    assert engine.aborted == []
    assert lifecycle.in_flight == 0


def test_non_streamed_request_aborted_after_grace() -> None:
    engine = FakeEngine(never_finish=True)
    app = make_app(engine, grace_seconds=0.1)

    async def scenario() -> tuple[httpx.Response, bool]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            running = asyncio.create_task(client.post(URL, json=chat_body()))
            await wait_until(lambda: engine.submitted)
            all_finished = await app.state.lifecycle.drain()
            return await running, all_finished

    response, all_finished = run(scenario())

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "server_shutting_down"
    assert "grace period" in error["message"]
    assert all_finished is False
    assert engine.aborted == [engine.submitted[0].request_id]
    assert app.state.lifecycle.in_flight == 0


def test_stream_aborted_after_grace() -> None:
    engine = FakeEngine(never_finish=True)
    app = make_app(engine, grace_seconds=0.1)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            running = asyncio.create_task(client.post(URL, json=chat_body(stream=True)))
            await wait_until(lambda: engine.submitted)
            await app.state.lifecycle.drain()
            return await running

    response = run(scenario())

    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "server_shutting_down"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == FULL_TEXT
    assert engine.aborted == [engine.submitted[0].request_id]
    assert app.state.lifecycle.in_flight == 0


# The real engine's thread dies mid-stream


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def start_engine(checkpoint: Any) -> Engine:
    config = ServerConfig(
        model=str(checkpoint[0]), draft=str(checkpoint[1]), dtype="float32", device="cpu",
        max_model_len=256, tree_total_tokens=8, max_num_seqs=2,
    )
    engine = Engine(config)
    engine.load()
    return engine


def fail_thread_mid_generation(engine: Engine) -> None:
    """Make the engine thread raise once every running request has 20 tokens or more."""
    original = engine._update_gauges

    def update_gauges_then_fail() -> None:
        original()
        if engine._running and all(request.completion_tokens >= 20 for request in engine._running.values()):
            raise RuntimeError("simulated engine failure")

    engine._update_gauges = update_gauges_then_fail  # type: ignore[method-assign]


def test_engine_death_ends_open_requests(checkpoint: Any) -> None:
    engine = start_engine(checkpoint)
    fail_thread_mid_generation(engine)
    app = create_app(ServerConfig(api_key=None), engine, Metrics(engine.model_name))

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response, httpx.Response]:
        engine.start(load=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            body = chat_body(temperature=0, max_tokens=200)
            streamed, collected = await asyncio.gather(
                client.post(URL, json={**body, "stream": True}), client.post(URL, json=body)
            )
            return streamed, collected, await client.get("/health"), await client.post(URL, json=body)

    try:
        streamed, collected, health, after = run(scenario())
    finally:
        engine.shutdown()

    assert engine.alive is False
    events = sse_events(streamed.text)
    assert streamed.status_code == 200
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error"
    assert all(event["choices"][0]["finish_reason"] is None for event in events[:-2])
    assert any(event["choices"][0]["delta"].get("content") for event in events[1:-2]), "no text before the failure"
    assert collected.status_code == 500
    assert collected.json()["error"]["code"] == "engine_error"
    assert health.status_code == 503
    assert health.json()["error"]["code"] == "engine_dead"
    assert after.status_code == 503


def test_submit_after_engine_stopped_raises(checkpoint: Any) -> None:
    engine = start_engine(checkpoint)
    engine.start(load=False)
    engine.shutdown()

    async def submit() -> None:
        engine.submit("late", engine.prepare([{"role": "user", "content": "hi"}]), SamplingParams(max_tokens=4))

    with pytest.raises(EngineError, match="stopped"):
        run(submit())
