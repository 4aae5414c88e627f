"""On the demo model in float32, speculative greedy output equals Hugging Face greedy generate.

The photos and questions are not in the demo draft's training data (data/demo), so the
draft is exercised as it is on new input.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from transformers import LlavaForConditionalGeneration

from engine_helpers import joined, run_requests
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams

pytestmark = pytest.mark.integration

NEW_TOKENS = 64
PHOTOS = {"camera": data.camera, "cell": data.cell, "colorwheel": data.colorwheel}
QUESTIONS = ["What is shown in this picture?", "Write a short poem about the colors you see."]


@pytest.fixture(scope="module")
def engine(demo_paths):
    config = ServerConfig(
        model=str(demo_paths.target), draft=str(demo_paths.draft), dtype="float32", device="cpu",
        max_num_seqs=3, max_model_len=1024, tree_total_tokens=16,
    )
    engine = Engine(config)
    engine.load()
    engine.start(load=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(demo_paths):
    return LlavaForConditionalGeneration.from_pretrained(demo_paths.target, dtype=torch.float32).eval()


def _messages(photo: np.ndarray, question: str) -> list[dict]:
    image = Image.fromarray(photo).convert("RGB")  # camera and cell are greyscale
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.mark.parametrize("question", QUESTIONS)
def test_speculative_matches_hf_greedy(engine, reference, question):
    prompts = [engine.prepare(_messages(load(), question)) for load in PHOTOS.values()]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    results = run_requests(engine, [(prompt, params) for prompt in prompts])
    for name, prompt, outputs in zip(PHOTOS, prompts, results):
        ids = torch.tensor([prompt.token_ids])
        with torch.inference_mode():
            generated = reference.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values,
                max_new_tokens=NEW_TOKENS, do_sample=False,
            )
        expected = generated[0, ids.shape[1]:].tolist()
        text, last = joined(outputs)
        ours = [token for output in outputs for token in output.token_ids]
        assert ours == expected, f"token mismatch on {name}"
        assert text == engine.target.tokenizer.decode(expected, skip_special_tokens=True)
        assert last.completion_tokens == len(expected)


def test_decoder_logits_match_hf(engine, reference):
    from draft_models.llama_layers import AttentionMask

    prompt = engine.prepare(_messages(data.astronaut(), QUESTIONS[0]))
    target = engine.target
    token_ids = torch.tensor(prompt.token_ids)
    count = len(prompt.token_ids)
    cache = target.decoder.make_cache(num_slots=1, max_len=count)
    zero = torch.zeros(1, dtype=torch.long)
    mask = AttentionMask.build(zero, zero, zero, AttentionMask.causal(count, "cpu")[None])
    with torch.inference_mode():
        embeds = target.embed_prompt(token_ids, prompt.pixel_values)[None]
        ours = target.decoder.logits(target.decoder(embeds, torch.arange(count)[None], cache, mask))[0]
        expected = reference(
            input_ids=token_ids[None], attention_mask=torch.ones(1, count, dtype=torch.long),
            pixel_values=prompt.pixel_values,
        ).logits[0].float()
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)
