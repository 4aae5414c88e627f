"""The target decoder reproduces Hugging Face's LLaVA logits on the same checkpoint."""

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from draft_models.llama_layers import AttentionMask
from server.engine.target import TargetModel
from tiny_models import build_tiny_llava


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "model")


def _prompt(target: TargetModel):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the color of this picture"}]}]
    text = target.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (40, 30), (200, 30, 60))
    return target.processor(text=text, images=[image], return_tensors="pt")


def _prefill_logits(target: TargetModel, inputs) -> torch.Tensor:
    token_ids = inputs["input_ids"][0]
    embeds = target.embed_prompt(token_ids, inputs["pixel_values"])[None]
    count = token_ids.shape[0]
    cache = target.decoder.make_cache(num_slots=2, max_len=count + 8)
    zero = torch.zeros(1, dtype=torch.long)
    mask = AttentionMask.build(
        torch.tensor([1]), zero, zero, AttentionMask.causal(count, "cpu")[None]
    )
    with torch.inference_mode():
        features = target.decoder(embeds, torch.arange(count)[None], cache, mask)
        return target.decoder.logits(features)[0], cache


def test_decoder_logits_match_hf(tiny_llava):
    target = TargetModel(tiny_llava, dtype="float32", device="cpu")
    inputs = _prompt(target)
    ours, _ = _prefill_logits(target, inputs)
    reference = LlavaForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference(**inputs).logits[0].float()
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_decoder_incremental_matches_prefill(tiny_llava):
    """Logits of a token fed after a cached prefix equal those of one full prefill."""
    target = TargetModel(tiny_llava, dtype="float32", device="cpu")
    inputs = _prompt(target)
    full, _ = _prefill_logits(target, inputs)
    token_ids = inputs["input_ids"][0]
    embeds = target.embed_prompt(token_ids, inputs["pixel_values"])[None]
    count = token_ids.shape[0]
    cache = target.decoder.make_cache(num_slots=1, max_len=count + 8)
    split = count - 3
    slot = torch.tensor([0])
    with torch.inference_mode():
        first = AttentionMask.build(slot, torch.tensor([0]), torch.tensor([0]), AttentionMask.causal(split, "cpu")[None])
        target.decoder(embeds[:, :split], torch.arange(split)[None], cache, first)
        rest = AttentionMask.build(
            slot, torch.tensor([split]), torch.tensor([split]), AttentionMask.causal(count - split, "cpu")[None]
        )
        features = target.decoder(embeds[:, split:], torch.arange(split, count)[None], cache, rest)
        tail = target.decoder.logits(features)[0]
    torch.testing.assert_close(tail, full[split:], atol=1e-5, rtol=1e-5)
