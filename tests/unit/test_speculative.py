"""Speculative decoding on a tiny random LLaVA is token-identical to Hugging Face greedy."""

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from draft_models.eagle import write_initial_draft
from engine_helpers import OracleDraft, joined, run_requests
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.speculative import SpeculativeDecoder
from server.engine.types import SamplingParams
from tiny_models import build_tiny_checkpoint

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=["feature_sampling", "partial_alignment", "fspad"])
def variant_checkpoint(request, checkpoint, tmp_path_factory):
    """The tiny target with an untrained draft of each FSPAD variant."""
    folder = tmp_path_factory.mktemp("draft") / request.param
    write_initial_draft(
        checkpoint[0], folder, seed=3,
        feature_sampling=request.param in ("feature_sampling", "fspad"),
        partial_alignment=request.param in ("partial_alignment", "fspad"),
    )
    return checkpoint[0], folder


@pytest.fixture(scope="module")
def reference(checkpoint):
    return LlavaForConditionalGeneration.from_pretrained(checkpoint[0], dtype=torch.float32).eval()


def make_engine(checkpoint, **overrides) -> Engine:
    target, draft = checkpoint
    settings = dict(
        model=str(target), draft=str(draft), dtype="float32", device="cpu", max_model_len=256, tree_total_tokens=8
    )
    settings.update(overrides)
    engine = Engine(ServerConfig(**settings))
    engine.load()
    engine.start(load=False)
    return engine


def messages(text: str, color) -> list[dict]:
    image = Image.new("RGB", (48, 40), color)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


PROMPTS = [("what is the color of this picture", (200, 30, 60)), ("is there a cat in the image", (10, 120, 250))]


def hf_greedy(reference, engine, prompt, max_new_tokens=NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    with torch.inference_mode():
        out = reference.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values,
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(engine.target.eos_token_ids),
        )
    return out[0, ids.shape[1]:].tolist()


def generated_ids(outputs) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


@pytest.mark.parametrize("speculative", [True, False])
def test_greedy_matches_hf(checkpoint, reference, speculative):
    engine = make_engine(checkpoint, speculative=speculative)
    try:
        prompts = [engine.prepare(messages(text, color)) for text, color in PROMPTS]
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
        results = run_requests(engine, [(p, params) for p in prompts])  # both in one batch
        for prompt, outputs in zip(prompts, results):
            expected = hf_greedy(reference, engine, prompt)
            text, last = joined(outputs)
            assert generated_ids(outputs) == expected
            assert last.completion_tokens == len(expected)
            assert text == engine.target.tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        engine.shutdown()


def _oracle_engine(checkpoint, reference, prompt_text, color):
    """An engine whose draft proposes the target's own greedy continuation."""
    engine = make_engine(checkpoint)
    prompt = engine.prepare(messages(prompt_text, color))
    expected = hf_greedy(reference, engine, prompt, max_new_tokens=40)
    next_token = {}
    for current, following in zip(expected, expected[1:]):
        next_token.setdefault(current, following)
    decoder = engine.target.decoder
    oracle = OracleDraft(decoder.embed_tokens, decoder.lm_head, next_token)
    engine.decoder = SpeculativeDecoder(engine.target, oracle, 4, engine.max_model_len, 4, 2, 8)
    return engine, prompt, expected


def test_oracle_draft_commits_several_tokens(checkpoint, reference):
    engine, prompt, expected = _oracle_engine(checkpoint, reference, *PROMPTS[0])
    try:
        outputs = run_requests(engine, [(prompt, SamplingParams(max_tokens=40, temperature=0.0))])[0]
        _, last = joined(outputs)
        assert generated_ids(outputs) == expected
        assert last.spec_accepted_tokens > 0
        assert last.spec_steps < len(expected) - 1
    finally:
        engine.shutdown()


def test_eos_inside_accepted_tokens(checkpoint, reference):
    engine, prompt, expected = _oracle_engine(checkpoint, reference, *PROMPTS[0])
    try:
        cut = 9  # EOS at a position that a multi-token step commits past
        engine.target.eos_token_ids = {expected[cut]}
        first_eos = expected.index(expected[cut])
        outputs = run_requests(engine, [(prompt, SamplingParams(max_tokens=40, temperature=0.0))])[0]
        text, last = joined(outputs)
        assert last.finish_reason == "stop"
        assert generated_ids(outputs) == expected[: first_eos + 1]
        assert last.completion_tokens == first_eos + 1
        assert text == engine.target.tokenizer.decode(expected[:first_eos], skip_special_tokens=True)
    finally:
        engine.shutdown()


def test_stop_string_inside_accepted_tokens(checkpoint, reference):
    engine, prompt, expected = _oracle_engine(checkpoint, reference, *PROMPTS[0])
    try:
        tokenizer = engine.target.tokenizer
        full_text = tokenizer.decode(expected, skip_special_tokens=True)
        words = full_text.split(" ")
        stop = " ".join(words[6:8])
        outputs = run_requests(engine, [(prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]))])[0]
        text, last = joined(outputs)
        assert last.finish_reason == "stop"
        assert text == full_text[: full_text.index(stop)]
        assert stop not in text
        assert last.completion_tokens < len(expected)
        assert sum(len(o.token_ids) for o in outputs) == last.completion_tokens
    finally:
        engine.shutdown()


def test_max_tokens_inside_accepted_tokens(checkpoint, reference):
    engine, prompt, expected = _oracle_engine(checkpoint, reference, *PROMPTS[0])
    try:
        outputs = run_requests(engine, [(prompt, SamplingParams(max_tokens=7, temperature=0.0))])[0]
        _, last = joined(outputs)
        assert last.finish_reason == "length"
        assert generated_ids(outputs) == expected[:7]
        assert last.completion_tokens == 7
    finally:
        engine.shutdown()


def test_fspad_variants_match_hf(variant_checkpoint, reference):
    engine = make_engine(variant_checkpoint)
    try:
        assert engine.decoder.draft is not None
        prompt = engine.prepare(messages(*PROMPTS[1]))
        outputs = run_requests(engine, [(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))])[0]
        joined(outputs)
        assert generated_ids(outputs) == hf_greedy(reference, engine, prompt)
    finally:
        engine.shutdown()
