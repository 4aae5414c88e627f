"""Speculative sampling keeps the target's distribution: chi-square tests on a tiny target.

One speculative step is run many times from the same committed prefix, each time with a
fresh random generator. The first committed token must follow the target's processed
distribution after the prefix, and the second (given an accepted first token) the
target's distribution after prefix + that token. The draft proposes the target's greedy
chain first (plus arbitrary siblings), so acceptance happens often and at depth 2.
"""

import copy

import pytest
import torch
from PIL import Image

from draft_models.eagle import write_initial_draft
from draft_models.llama_layers import AttentionMask
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.sampling import target_probs
from server.engine.speculative import SpeculativeDecoder
from engine_helpers import OracleDraft
from server.engine.types import SamplingParams
from tiny_models import build_tiny_llava

TRIALS = 600
MIN_EXPECTED = 5.0  # cells expected below this are pooled, as a chi-square test needs
SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    target = build_tiny_llava(root / "target", seed=1)
    write_initial_draft(target, root / "draft", seed=5)
    config = ServerConfig(model=str(target), draft=str(root / "draft"), dtype="float32", device="cpu",
                          max_model_len=128, tree_depth=3, tree_top_k=4, tree_total_tokens=10)
    engine = Engine(config)
    engine.load()
    return engine


def _prompt(engine):
    image = Image.new("RGB", (32, 32), (90, 160, 20))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is this"}]}]
    return engine.prepare(messages)


def _target_distribution(engine, token_ids, pixel_values, params) -> torch.Tensor:
    target = engine.target
    count = len(token_ids)
    cache = target.decoder.make_cache(1, count)
    zero = torch.zeros(1, dtype=torch.long)
    mask = AttentionMask.build(zero, zero, zero, AttentionMask.causal(count, "cpu")[None])
    with torch.inference_mode():
        embeds = target.embed_prompt(torch.tensor(token_ids), pixel_values)[None]
        features = target.decoder(embeds, torch.arange(count)[None], cache, mask)
        return target_probs(target.decoder.logits(features[0, -1]), params)


def _start_with_oracle(engine, params):
    """Prefill, then install a draft that proposes the target's greedy chain from the root."""
    prompt = _prompt(engine)
    generator = torch.Generator().manual_seed(0)
    start = engine.decoder.prefill(0, torch.tensor(prompt.token_ids), prompt.pixel_values, params, generator)
    chain = prompt.token_ids + [start.root_token]
    greedy = SamplingParams(max_tokens=1, temperature=1.0, top_k=1)
    next_token = {}
    for _ in range(3):
        token = int(_target_distribution(engine, chain, prompt.pixel_values, greedy).argmax())
        next_token.setdefault(chain[-1], token)
        chain.append(token)
    decoder = engine.target.decoder
    oracle = OracleDraft(decoder.embed_tokens, decoder.lm_head, next_token)
    speculative = SpeculativeDecoder(engine.target, oracle, 1, 128, depth=3, top_k=3, total_tokens=8)
    start = speculative.prefill(0, torch.tensor(prompt.token_ids), prompt.pixel_values, params,
                                torch.Generator().manual_seed(0))
    return speculative, start, prompt


def _p_value(samples: list[int], probs: torch.Tensor) -> float:
    total = len(samples)
    observed = torch.bincount(torch.tensor(samples), minlength=probs.shape[0]).double()
    expected = probs.double() * total
    if (observed[expected == 0] > 0).any():
        return 0.0  # a token the target never produces
    big = expected >= MIN_EXPECTED
    cells_observed = torch.cat((observed[big], observed[~big].sum()[None]))
    cells_expected = torch.cat((expected[big], expected[~big].sum()[None]))
    keep = cells_expected > 0
    statistic = (((cells_observed - cells_expected) ** 2)[keep] / cells_expected[keep]).sum()
    degrees = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2.0, dtype=torch.double), statistic / 2))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=8, temperature=1.3),
        SamplingParams(max_tokens=8, temperature=0.8, top_k=6),
        SamplingParams(max_tokens=8, temperature=1.0, top_p=0.7),
    ],
    ids=["temperature", "top_k", "top_p"],
)
def test_step_samples_target_distribution(engine, params):
    decoder, start, prompt = _start_with_oracle(engine, params)
    prefix = prompt.token_ids + [start.root_token]
    accepted_any = 0
    firsts, seconds_by_first = [], {}
    for trial in range(TRIALS):
        state = copy.copy(start)
        result = decoder.step([state], [params], [torch.Generator().manual_seed(1000 + trial)])[0]
        first = result.committed[0]
        firsts.append(first)
        if len(result.committed) > 1:
            accepted_any += 1
            seconds_by_first.setdefault(first, []).append(result.committed[1])

    first_probs = _target_distribution(engine, prefix, prompt.pixel_values, params)
    assert _p_value(firsts, first_probs) > SIGNIFICANCE
    assert accepted_any > 0, "no draft token was ever accepted, so the test did not exercise acceptance"


def test_second_token_after_accepted_first(engine):
    """The token committed after an accepted draft token follows the target's conditional."""
    params = SamplingParams(max_tokens=8, temperature=0.9)
    decoder, start, prompt = _start_with_oracle(engine, params)
    prefix = prompt.token_ids + [start.root_token]
    proposed = decoder.draft.next_token[start.root_token]
    seconds = []
    for trial in range(TRIALS):
        state = copy.copy(start)
        committed = decoder.step([state], [params], [torch.Generator().manual_seed(5000 + trial)])[0].committed
        # A first token equal to the proposed child and followed by another token was
        # accepted from the tree. The next token then samples the target's conditional.
        if committed[0] == proposed and len(committed) > 1:
            seconds.append(committed[1])
    second_probs = _target_distribution(engine, prefix + [proposed], prompt.pixel_values, params)
    assert len(seconds) > 50
    assert _p_value(seconds, second_probs) > SIGNIFICANCE
