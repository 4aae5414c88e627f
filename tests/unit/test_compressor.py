"""The draft-side visual compressor: primitive shapes, the gate, and lossless serving with it."""

import json

import pytest
import torch

from compressors import PRIMITIVES, CompressorConfig, VisualCompressor, image_spans
from compressors.primitives import Conv, ImageContext, Pool, Prune, Resampler, TextOnly, grid_for, pool_to_budget
from draft_models.eagle import write_initial_draft
from engine_helpers import run_requests
from server.engine.types import SamplingParams
from test_speculative import PROMPTS, generated_ids, hf_greedy, make_engine, messages
from test_training import target, workspace  # noqa: F401 (fixtures)
from tiny_models import build_tiny_checkpoint

HIDDEN = 32
GRIDS = [(14, 14), (6, 10), (5, 3), (1, 7)]


def context(grid, seed=0) -> ImageContext:
    generator = torch.Generator().manual_seed(seed)
    count = grid[0] * grid[1]
    return ImageContext(grid, torch.randn(count, HIDDEN, generator=generator), torch.randn(HIDDEN, generator=generator))


def rows(grid, seed=1) -> torch.Tensor:
    return torch.randn(grid[0] * grid[1], HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(
    "primitive, expected",
    [
        (Prune(4.0), lambda h, w: -(-h * w // 4)),
        (Prune(4.0, score="random"), lambda h, w: -(-h * w // 4)),
        (Pool(4.0), lambda h, w: -(-h // 2) * -(-w // 2)),
        (Pool(16.0), lambda h, w: -(-h // 4) * -(-w // 4)),
        (Conv(HIDDEN, 4.0), lambda h, w: -(-h // 2) * -(-w // 2)),
        (Conv(HIDDEN, 9.0), lambda h, w: -(-h // 3) * -(-w // 3)),
        (Resampler(HIDDEN, 2), lambda h, w: 2),
        (TextOnly(), lambda h, w: 0),
    ],
)
def test_primitive_shapes(primitive, expected, grid):
    out = primitive(rows(grid), context(grid))
    assert out.shape == (expected(*grid), HIDDEN)
    assert primitive.num_tokens(*grid) == out.shape[0]


def test_pool_averages_cells():
    grid = (2, 4)
    values = torch.arange(8, dtype=torch.float32)[:, None].expand(8, HIDDEN)
    out = Pool(4.0)(values, context(grid))
    assert out[:, 0].tolist() == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4]


def test_untrained_conv_equals_pooling_on_divisible_grids():
    grid = (6, 4)
    data = rows(grid)
    assert torch.allclose(Conv(HIDDEN, 4.0)(data, context(grid)), Pool(4.0)(data, context(grid)), atol=1e-5)


def test_prune_keeps_question_relevant_tokens_in_order():
    grid = (2, 3)
    features = torch.zeros(6, HIDDEN)
    summary = torch.zeros(HIDDEN)
    summary[0] = 1.0
    features[[1, 4], 0] = 1.0  # tokens 1 and 4 point the prompt's way
    features[[0, 2, 3, 5], 1] = 1.0
    data = rows(grid)
    out = Prune(3.0)(data, ImageContext(grid, features, summary))
    assert torch.equal(out, data[[1, 4]])


def test_pool_to_budget():
    data = rows((14, 14))
    for budget in (0, 1, 5, 49, 196, 500):
        out = pool_to_budget(data, (14, 14), budget)
        assert out.shape[0] <= budget
        assert out.shape[0] == 0 if budget == 0 else out.shape[0] > 0


def test_grid_for():
    assert grid_for(196) == (14, 14)
    assert grid_for(577) == (1, 577)


def test_image_spans_split_adjacent_images():
    visual = torch.tensor([0, 1, 1, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    assert image_spans(visual, 3) == [(1, 3), (3, 5), (7, 9)]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        image_spans(visual, 4)


def compressor(mode="select", **overrides) -> VisualCompressor:
    torch.manual_seed(0)
    return VisualCompressor(CompressorConfig(mode=mode, **overrides), HIDDEN).eval()


@pytest.mark.parametrize("grid", [(14, 14), (6, 10)])
def test_gate_choice_is_deterministic_at_inference(grid):
    first = compressor()
    second = compressor()
    second.load_state_dict(first.state_dict())
    data, ctx = rows(grid), context(grid)
    choices = set()
    for module in (first, second, first):
        out, name, cost = module.compress_image(data, ctx, "select", None)
        choices.add((name, out.shape[0]))
        assert float(cost) == 0.0
    assert len(choices) == 1


def test_select_respects_the_budget():
    module = compressor()
    data, ctx = rows((14, 14)), context((14, 14))
    counts = dict(zip(PRIMITIVES, module.counts((14, 14))))
    for budget in (0, 1, 2, 12, 49, 196):
        out, name, _ = module.compress_image(data, ctx, "select", budget)
        assert out.shape[0] <= budget
        assert counts[name] == out.shape[0]
    for mode in ("weight", "concat"):
        out, name, _ = module.compress_image(data, ctx, mode, 3)
        assert out.shape[0] <= 3
        assert name == "pool"


def test_weight_and_concat_sizes():
    module = compressor()
    data, ctx = rows((14, 14)), context((14, 14))
    weighted, name, _ = module.compress_image(data, ctx, "weight", None)
    assert (weighted.shape[0], name) == (49, "weight")
    concat, name, _ = module.compress_image(data, ctx, "concat", None)
    assert (concat.shape[0], name) == (16 + 49, "concat")


def test_select_training_sample_carries_gate_gradient_and_cost():
    module = compressor(cost_weight=0.5).train()
    data, ctx = rows((14, 14)), context((14, 14))
    torch.manual_seed(0)
    names = set()
    for _ in range(30):
        module.zero_grad()
        out, name, cost = module.compress_image(data, ctx, "select", None)
        names.add(name)
        (out.sum() + cost).backward()
        assert module.gate.net[0].weight.grad.abs().sum() > 0
        assert float(cost.detach()) > 0
    assert len(names) > 1  # Gumbel noise explores


def test_compress_sequence_keeps_text_rows():
    module = compressor()
    length, spans = 30, [(3, 19)]  # one 4 x 4 image
    data = rows((1, length))
    features = rows((1, length), seed=2)
    text = torch.ones(length, dtype=torch.bool)
    text[3:19] = False
    result = module.compress_sequence(data, features, spans, text, "concat")
    kept = result.choices[0].draft_tokens
    assert result.rows.shape[0] == length - 16 + kept
    outside = torch.cat((torch.arange(3), torch.arange(19, length)))
    assert torch.equal(result.rows[result.source_index[outside]], data[outside])
    assert result.choices[0].target_tokens == 16


# ----- serving: lossless with every mode ------------------------------------------------------

MODES = [
    ("none", None),
    ("select", ["prune"]),
    ("select", ["pool"]),
    ("select", ["conv"]),
    ("select", ["resampler"]),
    ("select", ["text"]),
    ("select", None),
    ("weight", None),
    ("concat", None),
]


@pytest.fixture(scope="module")
def target_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-compressor"))[0]


@pytest.fixture(scope="module")
def reference(target_checkpoint):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(target_checkpoint, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode, primitives", MODES)
def test_greedy_matches_hf_with_every_mode(target_checkpoint, reference, tmp_path, mode, primitives):
    draft = tmp_path / "draft"
    trained_mode = "select" if mode == "none" else mode
    config = CompressorConfig(mode=trained_mode, **({"primitives": primitives} if primitives else {}))
    write_initial_draft(target_checkpoint, draft, seed=5, compressor=config)
    engine = make_engine((target_checkpoint, draft), draft_compressor=mode if mode == "none" else "auto")
    try:
        prompts = [engine.prepare(messages(text, color)) for text, color in PROMPTS]
        params = SamplingParams(max_tokens=16, temperature=0.0)
        results = run_requests(engine, [(p, params) for p in prompts])
        for prompt, outputs in zip(prompts, results):
            assert generated_ids(outputs) == hf_greedy(reference, engine, prompt, max_new_tokens=16)
            last = outputs[-1]
            assert len(last.compressor_choices) == 1
            if primitives and len(primitives) == 1:
                assert last.compressor_choices == primitives
            expected_draft = {"none": 16, "weight": 4, "concat": 1 + 4}.get(mode)
            if expected_draft is not None:
                assert last.draft_visual_tokens == expected_draft
    finally:
        engine.shutdown()


def test_compressor_mode_needs_a_compressor(target_checkpoint, tmp_path):
    write_initial_draft(target_checkpoint, tmp_path / "plain")
    with pytest.raises(ValueError, match="has no visual compressor"):
        make_engine((target_checkpoint, tmp_path / "plain"), draft_compressor="select")


def test_checkpoint_records_the_compressor(target_checkpoint, tmp_path):
    write_initial_draft(target_checkpoint, tmp_path / "draft", compressor=CompressorConfig(mode="weight", pool_ratio=9))
    recorded = json.loads((tmp_path / "draft" / "config.json").read_text())["compressor"]
    assert recorded["mode"] == "weight"
    assert recorded["pool_ratio"] == 9


# ----- training jointly with the draft --------------------------------------------------------


@pytest.mark.parametrize("mode", ["select", "weight", "concat"])
def test_trained_compressor_loads_and_serves(workspace, target, tmp_path, mode):
    from safetensors.torch import load_file

    from draft_models.training.trainer import DraftTrainer
    from server.config import ServerConfig
    from server.engine.engine import Engine
    from server.metrics import Metrics
    from test_training import make_config

    config = make_config(workspace, tmp_path / "run", max_steps=3, compressor=mode, lr=1e-2)
    trainer = DraftTrainer(config, target)
    initial = {name: value.clone() for name, value in trainer.draft.compressor.state_dict().items()}
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(step.loss)) for step in result.history)
    saved = json.loads((result.final_draft / "config.json").read_text())
    assert saved["compressor"]["mode"] == mode
    weights = load_file(str(result.final_draft / "model.safetensors"))
    trained = "gate.net.0.weight" if mode != "concat" else "primitives.conv.conv.weight"
    assert not torch.equal(weights["compressor." + trained], initial[trained])

    engine = Engine(ServerConfig(
        model=str(workspace / "target"), draft=str(result.final_draft), dtype="float32", device="cpu",
        max_model_len=256, tree_total_tokens=8,
    ))
    metrics = Metrics("tiny")
    engine.metrics = metrics
    engine.load()
    engine.start(load=False)
    try:
        prompt = engine.prepare(messages(*PROMPTS[0]))
        outputs = run_requests(engine, [(prompt, SamplingParams(max_tokens=8, temperature=0.0))])[0]
        assert outputs[-1].error is None
    finally:
        engine.shutdown()
    value = metrics.registry.get_sample_value
    target_tokens = value("specvlm_visual_tokens_total", {"model_name": "tiny", "model": "target"})
    draft_tokens = value("specvlm_visual_tokens_total", {"model_name": "tiny", "model": "draft"})
    assert target_tokens == 16
    assert draft_tokens < target_tokens
    chosen = outputs[-1].compressor_choices[0]
    assert value("specvlm_compressor_selected_total", {"model_name": "tiny", "primitive": chosen}) == 1
