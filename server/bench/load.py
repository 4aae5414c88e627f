"""Load mode: N concurrent streaming clients against a running server.

Each concurrency level sends a bounded number of chat-completion requests (and stops
sending new ones after a time limit). Every client streams the response over SSE, the
way an OpenAI client does, and records when each content chunk arrives.

Latency definitions:
- time to first token (TTFT): from sending the request to the first content chunk;
- inter-token latency (ITL): the gap between consecutive content chunks. A speculative
  step can put several tokens in one chunk, so this is a per-chunk gap;
- time per output token (TPOT): (end-to-end latency - TTFT) / (output tokens - 1), per request.
A completed response without text (EOS first) has no TTFT, so it counts in throughput but
not in the latency percentiles; `requests_without_text` counts those.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from server.bench.prompts import BenchPrompt

logger = logging.getLogger(__name__)


@dataclass
class LoadSettings:
    url: str
    concurrency: list[int]
    num_requests: int  # per concurrency level
    max_seconds: float  # per level: no new request starts after this
    max_tokens: int
    temperature: float = 0.0
    model: str | None = None  # the served model id; default: the first of GET /v1/models
    api_key: str | None = None
    request_timeout: float = 300.0


@dataclass
class RequestRecord:
    ok: bool
    error: str | None = None
    output_tokens: int = 0
    ttft_seconds: float | None = None  # None when the response has no text (EOS first)
    latency_seconds: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)


def _headers(settings: LoadSettings) -> dict:
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


async def _served_model(client, settings: LoadSettings) -> str:
    if settings.model:
        return settings.model
    try:
        response = await client.get("/v1/models", headers=_headers(settings))
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise ConnectionError(f"GET {settings.url}/v1/models failed ({error}); start the server, "
                              "or pass the right --url and --api-key") from None
    models = response.json().get("data", [])
    if not models:
        raise RuntimeError(f"GET {settings.url}/v1/models returned no model; pass --served-model-name")
    return models[0]["id"]


async def _stream_one(client, body: dict, settings: LoadSettings) -> RequestRecord:
    start = time.perf_counter()
    last_chunk = None
    record = RequestRecord(ok=False)
    finished = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=_headers(settings)) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    finished = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    record.error = f"stream error: {chunk['error'].get('type', 'unknown')}"
                    return record
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if last_chunk is None:
                        record.ttft_seconds = now - start
                    else:
                        record.chunk_gaps.append(now - last_chunk)
                    last_chunk = now
    except httpx.HTTPError as error:
        record.error = type(error).__name__
        logger.debug("request failed: %r", error)
        return record
    except ValueError as error:
        record.error = "invalid SSE chunk"
        logger.debug("request returned an invalid SSE chunk: %s", error)
        return record
    record.latency_seconds = time.perf_counter() - start
    record.ok = finished
    if not finished:
        record.error = "stream ended without [DONE]"
    return record


async def _run_level(client, model: str, prompts: list[BenchPrompt], concurrency: int,
                     settings: LoadSettings, bar) -> dict:
    messages = [prompt.openai_messages() for prompt in prompts]
    records: list[RequestRecord] = []
    next_index = 0
    start = time.perf_counter()
    deadline = start + settings.max_seconds

    async def client_loop() -> None:
        nonlocal next_index
        while next_index < settings.num_requests and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            body = {"model": model, "messages": messages[index % len(messages)], "max_tokens": settings.max_tokens,
                    "temperature": settings.temperature, "stream": True, "stream_options": {"include_usage": True}}
            records.append(await _stream_one(client, body, settings))
            bar.update()

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return summarize_level(concurrency, records, time.perf_counter() - start, settings.num_requests)


def _percentiles(values: list[float], scale: float = 1.0) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)

    def pick(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))] * scale

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize_level(concurrency: int, records: list[RequestRecord], seconds: float, planned: int) -> dict:
    """Aggregate one concurrency level; latencies in milliseconds."""
    done = [record for record in records if record.ok]
    tokens = sum(record.output_tokens for record in done)
    tpot = [
        (record.latency_seconds - record.ttft_seconds) / (record.output_tokens - 1)
        for record in done if record.output_tokens > 1 and record.ttft_seconds is not None
    ]
    return {
        "concurrency": concurrency,
        "requests_planned": planned,
        "requests_sent": len(records),
        "requests_completed": len(done),
        "requests_without_text": sum(record.ttft_seconds is None for record in done),
        "errors": dict(Counter(record.error for record in records if not record.ok)),
        "output_tokens": tokens,
        "duration_seconds": seconds,
        "output_tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "requests_per_second": len(done) / seconds if seconds > 0 else 0.0,
        "ttft_ms": _percentiles([record.ttft_seconds for record in done if record.ttft_seconds is not None], 1000),
        "itl_ms": _percentiles([gap for record in done for gap in record.chunk_gaps], 1000),
        "tpot_ms": _percentiles(tpot, 1000),
    }


async def _run_load(prompts: list[BenchPrompt], settings: LoadSettings, progress: bool) -> dict:
    timeout = httpx.Timeout(settings.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=max(settings.concurrency))
    async with httpx.AsyncClient(base_url=settings.url, timeout=timeout, limits=limits) as client:
        model = await _served_model(client, settings)
        levels = []
        for concurrency in settings.concurrency:
            with tqdm(total=settings.num_requests, desc=f"load N={concurrency}", unit="request",
                      disable=not progress) as bar:
                level = await _run_level(client, model, prompts, concurrency, settings, bar)
            logger.info("N=%d: %d/%d completed, %.1f output tokens/s, errors %s", concurrency,
                        level["requests_completed"], level["requests_sent"], level["output_tokens_per_second"],
                        level["errors"] or "none")
            levels.append(level)
    return {"served_model": model, "levels": levels}


def run_load(prompts: list[BenchPrompt], settings: LoadSettings, progress: bool = True) -> dict:
    """Run every concurrency level in turn against `settings.url` and return the results."""
    return asyncio.run(_run_load(prompts, settings, progress))
