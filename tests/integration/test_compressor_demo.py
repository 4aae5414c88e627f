"""On the demo model in float32, every compressor mode keeps greedy output equal to Hugging Face's.

The draft is the demo draft with a new, untrained compressor: the draft's quality does
not matter for losslessness, only that the draft really runs on a compressed view.
"""

import pytest
import torch
from safetensors.torch import load_file
from skimage import data
from transformers import LlavaForConditionalGeneration

from compressors import CompressorConfig
from draft_models.eagle import CONFIG_NAME, WEIGHTS_NAME, EagleConfig, EagleDraft, save_draft
from engine_helpers import joined, run_requests
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams
from test_lossless_demo import _messages

pytestmark = pytest.mark.integration

NEW_TOKENS = 48
PHOTOS = {"camera": data.camera, "coffee": data.coffee, "rocket": data.rocket}
QUESTION = "Describe the picture in two sentences."


@pytest.fixture(scope="module")
def compressor_draft(demo_paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compressor-draft")
    draft = EagleDraft(EagleConfig.from_file(demo_paths.draft / CONFIG_NAME))
    draft.load_state_dict(load_file(str(demo_paths.draft / WEIGHTS_NAME)))
    torch.manual_seed(0)
    draft.attach_compressor(CompressorConfig(mode="select"))
    save_draft(draft, folder)
    return folder


@pytest.fixture(scope="module")
def expected(demo_paths):
    """Hugging Face greedy tokens per photo, and the prompts they answer."""
    reference = LlavaForConditionalGeneration.from_pretrained(demo_paths.target, dtype=torch.float32).eval()
    engine = Engine(ServerConfig(model=str(demo_paths.target), speculative=False, dtype="float32", device="cpu"))
    engine.load()
    answers = {}
    for name, load in PHOTOS.items():
        prompt = engine.prepare(_messages(load(), QUESTION))
        ids = torch.tensor([prompt.token_ids])
        with torch.inference_mode():
            generated = reference.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values,
                max_new_tokens=NEW_TOKENS, do_sample=False,
            )
        answers[name] = (prompt, generated[0, ids.shape[1]:].tolist())
    return answers


@pytest.mark.parametrize("mode", ["none", "select", "weight", "concat"])
def test_every_mode_matches_hf_greedy(demo_paths, compressor_draft, expected, mode):
    engine = Engine(ServerConfig(
        model=str(demo_paths.target), draft=str(compressor_draft), dtype="float32", device="cpu",
        max_num_seqs=3, max_model_len=1024, tree_total_tokens=16, draft_compressor=mode,
    ))
    engine.load()
    engine.start(load=False)
    try:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
        results = run_requests(engine, [(prompt, params) for prompt, _ in expected.values()])
    finally:
        engine.shutdown()
    for name, outputs in zip(expected, results):
        _, last = joined(outputs)
        ours = [token for output in outputs for token in output.token_ids]
        assert ours == expected[name][1], f"token mismatch on {name} with mode {mode}"
        visual = 196
        if mode == "none":
            assert last.draft_visual_tokens == visual
        else:
            assert last.draft_visual_tokens < visual
