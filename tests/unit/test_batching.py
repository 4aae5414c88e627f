"""Continuous batching: requests share steps without changing each other's output."""

import asyncio

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from engine_helpers import joined, run_requests
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.types import QueueFullError, SamplingParams
from tiny_models import build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def make_engine(checkpoint, **overrides) -> Engine:
    settings = dict(model=str(checkpoint[0]), draft=str(checkpoint[1]), dtype="float32", device="cpu",
                    max_model_len=256, tree_total_tokens=8, max_num_seqs=8)
    settings.update(overrides)
    engine = Engine(ServerConfig(**settings))
    engine.load()
    engine.start(load=False)
    return engine


REQUESTS = [
    ("what is the color of this picture", (200, 30, 60), 20),
    ("is there a cat", None, 12),
    ("what is in the picture", (10, 120, 250), 30),
    ("the sky is blue and the sea is green", None, 25),
    ("how many trees are there", (20, 200, 20), 8),
    ("what is this", None, 17),
    ("a big red car and a small house", (250, 250, 0), 22),
    ("who is there", None, 5),
]


def _messages(text, color):
    if color is None:
        return [{"role": "user", "content": text}]
    image = Image.new("RGB", (40 + len(text), 36), color)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _ids(outputs):
    return [token for output in outputs for token in output.token_ids]


def test_eight_concurrent_greedy_equal_alone_and_hf(checkpoint):
    engine = make_engine(checkpoint)
    reference = LlavaForConditionalGeneration.from_pretrained(checkpoint[0], dtype=torch.float32).eval()
    try:
        prompts = [engine.prepare(_messages(text, color)) for text, color, _ in REQUESTS]
        params = [SamplingParams(max_tokens=count, temperature=0.0) for _, _, count in REQUESTS]
        together = run_requests(engine, list(zip(prompts, params)))
        for prompt, request_params, outputs in zip(prompts, params, together):
            alone = run_requests(engine, [(prompt, request_params)])[0]
            assert _ids(outputs) == _ids(alone)
            assert joined(outputs)[0] == joined(alone)[0]
            ids = torch.tensor([prompt.token_ids])
            images = {} if prompt.pixel_values is None else {"pixel_values": prompt.pixel_values}
            with torch.inference_mode():
                expected = reference.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **images,
                    max_new_tokens=request_params.max_tokens, do_sample=False,
                    eos_token_id=sorted(engine.target.eos_token_ids),
                )[0, ids.shape[1]:].tolist()
            assert _ids(outputs) == expected
    finally:
        engine.shutdown()


def test_seeded_request_same_alone_and_in_batch(checkpoint):
    engine = make_engine(checkpoint)
    try:
        seeded = (engine.prepare(_messages("what is in the picture", (90, 90, 200))),
                  SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234))
        alone = joined(run_requests(engine, [seeded])[0])[0]
        busy = [seeded] + [
            (engine.prepare(_messages(text, color)), SamplingParams(max_tokens=count, temperature=0.7))
            for text, color, count in REQUESTS[:6]
        ]
        in_batch = joined(run_requests(engine, busy)[0])[0]
        assert in_batch == alone
    finally:
        engine.shutdown()


def test_full_queue_rejects_then_recovers(checkpoint):
    engine = make_engine(checkpoint, max_num_seqs=1, max_waiting_requests=1)
    try:
        prompt = engine.prepare(_messages("what is this", None))
        params = SamplingParams(max_tokens=30, temperature=0.0)

        async def scenario():
            first = engine.submit("a", prompt, params)
            first_outputs = [await anext(first)]  # "a" now runs in the only slot
            second = engine.submit("b", prompt, params)  # waits: the queue is full
            with pytest.raises(QueueFullError):
                engine.submit("c", prompt, params)
            first_outputs += [o async for o in first]
            second_outputs = [o async for o in second]
            again = [o async for o in engine.submit("d", prompt, params)]
            return first_outputs, second_outputs, again

        for outputs in asyncio.run(scenario()):
            assert joined(outputs)[1].completion_tokens == 30
    finally:
        engine.shutdown()


def test_stop_string_across_steps(checkpoint):
    """Without a draft every step commits one token, so a two-token stop string spans two steps."""
    engine = make_engine(checkpoint, speculative=False)
    try:
        prompt = engine.prepare(_messages("what is in the picture", (10, 120, 250)))
        full = run_requests(engine, [(prompt, SamplingParams(max_tokens=30, temperature=0.0))])[0]
        ids = _ids(full)
        tokenizer = engine.target.tokenizer
        stop = tokenizer.decode(ids[6:8], skip_special_tokens=True).strip()
        text = joined(full)[0]
        cut = text.index(stop)
        outputs = run_requests(engine, [(prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]))])[0]
        stopped_text, last = joined(outputs)
        assert last.finish_reason == "stop"
        assert stopped_text == text[:cut]
        assert stop not in stopped_text
    finally:
        engine.shutdown()
