"""Draft training on a tiny random LLaVA: data, assistant mask, loss, trainer, checkpoints, eval."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from draft_models.eagle import load_draft
from draft_models.training.checkpoint import STATE_NAME, checkpoint_folder, load_training_state
from draft_models.training.cli import run_train_draft_command
from draft_models.training.config import TrainingConfig
from draft_models.training.data import ConversationDataset, collate, load_records
from draft_models.training.encoding import ConversationEncoder
from draft_models.training.evaluation import METRICS_NAME, PLOT_NAME
from draft_models.training.losses import (
    NOISE_REFERENCE_LENGTH,
    NOISE_SCALE,
    Teacher,
    TeacherForcedDraft,
    TeacherOutput,
    distillation_loss,
    draft_inputs,
    feature_noise,
    loss_positions,
    unrolled_embeds,
)
from draft_models.llama_layers import AttentionMask
from draft_models.training.components import DRAFT_DTYPE, build_draft
from draft_models.training.trainer import DraftTrainer
from server.cli import build_parser
from server.engine.target import TargetModel
from tiny_models import IMAGE_SIZE, PATCH_SIZE, build_tiny_llama, build_tiny_llava

VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2

IMAGE_RECORD = {
    "id": "red",
    "image": "red.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nwhat is the color of this picture"},
        {"from": "gpt", "value": "the picture is red"},
        {"from": "human", "value": "is there a cat"},
        {"from": "gpt", "value": "no there is not a cat"},
    ],
}
TEXT_RECORD = {
    "id": "sky",
    "conversations": [
        {"from": "system", "value": "you are a helpful assistant"},
        {"from": "human", "value": "is the sky blue"},
        {"from": "gpt", "value": "yes the sky is blue"},
    ],
}
ROLE_RECORD = {
    "messages": [
        {"role": "user", "content": "what is the color of the sea"},
        {"role": "assistant", "content": "the sea is blue and green"},
    ]
}
GOOD_RECORDS = [IMAGE_RECORD, TEXT_RECORD, ROLE_RECORD]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training")
    build_tiny_llava(root / "target")
    (root / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "images" / "red.jpg")
    (root / "train.json").write_text(json.dumps(GOOD_RECORDS))
    return root


@pytest.fixture(scope="module")
def target(workspace) -> TargetModel:
    return TargetModel(workspace / "target", dtype="float32", device="cpu")


def make_config(workspace: Path, out: Path, **overrides) -> TrainingConfig:
    settings = dict(
        target=str(workspace / "target"), data=str(workspace / "train.json"), image_folder=str(workspace / "images"),
        out=str(out), device="cpu", teacher_dtype="float32", batch_size=2, max_steps=4, lr=1e-3,
        save_every=0, eval_every=0, log_every=1,
    )
    settings.update(overrides)
    return TrainingConfig(**settings)


def encode(target, record, max_length=512, image_folder=None):
    encoder = ConversationEncoder.for_target(target, max_length)
    dataset = ConversationDataset([record], encoder, image_folder)
    return dataset[0], dataset


def tokens(target, ids) -> list[str]:
    return target.tokenizer.convert_ids_to_tokens(ids.tolist())


# ----- data and assistant mask ---------------------------------------------------------


def test_assistant_mask_marks_answers(target, workspace):
    example, _ = encode(target, IMAGE_RECORD, image_folder=workspace / "images")
    words = tokens(target, example.token_ids)
    marked = [word for word, is_answer in zip(words, example.assistant_mask.tolist()) if is_answer]
    assert marked == "the picture is red <|im_end|> no there is not a cat <|im_end|>".split()
    assert example.token_ids.shape == example.assistant_mask.shape
    assert words.count("<image>") == VISUAL_TOKENS
    assert example.pixel_values.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_mask_excludes_prompts_and_system(target):
    example, _ = encode(target, TEXT_RECORD)
    words = tokens(target, example.token_ids)
    marked = [word for word, is_answer in zip(words, example.assistant_mask.tolist()) if is_answer]
    assert marked == "yes the sky is blue <|im_end|>".split()
    assert example.pixel_values is None
    assert "system" in words


def test_role_content_turns_accepted(target):
    example, dataset = encode(target, ROLE_RECORD)
    assert example is not None
    assert not dataset.skipped
    assert int(example.assistant_mask.sum()) == len("the sea is blue and green".split()) + 1


def test_truncation_keeps_images_whole(target, workspace):
    record = {
        "image": "red.jpg",
        "conversations": [
            {"from": "human", "value": "is the sky blue"},
            {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "<image> what color"},
            {"from": "gpt", "value": "red"},
        ],
    }
    full, _ = encode(target, record, image_folder=workspace / "images")
    first_visual = tokens(target, full.token_ids).index("<image>")
    cut, _ = encode(target, record, max_length=first_visual + 5, image_folder=workspace / "images")
    assert len(cut.token_ids) == first_visual
    assert cut.pixel_values is None
    assert "<image>" not in tokens(target, cut.token_ids)


def test_bad_records_are_skipped_and_counted(target, workspace, caplog):
    records = [
        IMAGE_RECORD,
        {"id": "broken", "conversations": "not a list"},
        {"id": "lost", "image": "missing.jpg", "conversations": IMAGE_RECORD["conversations"]},
        {"conversations": [{"from": "alien", "value": "hello"}]},
        TEXT_RECORD,
    ]
    encoder = ConversationEncoder.for_target(target, 512)
    dataset = ConversationDataset(records, encoder, workspace / "images")
    with caplog.at_level(logging.WARNING):
        examples = [dataset[index] for index in range(len(records))] + [dataset[1]]  # record 1 twice
    assert [example is not None for example in examples[:5]] == [True, False, False, False, True]
    assert sorted(dataset.skipped) == [1, 2, 3]
    assert "not found" in dataset.skipped[2]
    assert sum("record 1:" in message for message in caplog.messages) == 1


def test_invalid_json_line_is_a_bad_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(TEXT_RECORD) + "\n{not json\n")
    records = load_records(path)
    assert len(records) == 2
    dataset = ConversationDataset(records, encoder=None)
    assert dataset[1] is None
    assert "line 2" in dataset.skipped[1]


def test_collate_pads_right(target):
    first, _ = encode(target, TEXT_RECORD)
    second, _ = encode(target, ROLE_RECORD)
    batch = collate([first, None, second], fill_token_id=0)
    assert batch.token_ids.shape == (2, max(len(first.token_ids), len(second.token_ids)))
    assert batch.lengths == [len(first.token_ids), len(second.token_ids)]
    assert not batch.assistant_mask[0, len(first.token_ids):].any()
    empty = collate([None, None], fill_token_id=2)
    assert not empty.assistant_mask.any()


# ----- loss ----------------------------------------------------------------------------


def test_loss_positions_shift_by_two():
    mask = torch.tensor([[False, False, False, True, True, False]])
    # Position i counts when token i + 2 is an assistant token; the draft has max_len - 1 positions.
    assert loss_positions(mask).tolist() == [[False, True, True, False, False]]


def test_loss_positions_of_unrolled_steps():
    mask = torch.tensor([[False, False, False, True, True, False]])
    # Unrolled step s at position i predicts token i + 2 + s.
    assert loss_positions(mask, 1).tolist() == [[True, True, False, False, False]]
    assert loss_positions(mask, 2).tolist() == [[True, False, False, False, False]]
    assert not loss_positions(mask, 5).any()


def test_unrolled_embeds_shift_left():
    embeds = torch.arange(5.0)[None, :, None].expand(2, 5, 3)
    later = unrolled_embeds(TeacherOutput(embeds, embeds), steps=3)
    assert later.shape == (2, 2, 4, 3)
    assert later[0, 0, :, 0].tolist() == [2.0, 3.0, 4.0, 0.0]  # step 1 reads e[i + 2]
    assert later[1, 1, :, 0].tolist() == [3.0, 4.0, 0.0, 0.0]  # step 2 reads e[i + 3]
    assert unrolled_embeds(TeacherOutput(embeds, embeds), steps=1) is None


def test_feature_noise_range():
    features = torch.zeros(2, 256, 8)
    noise = feature_noise(features, seq_len=256)
    bound = 0.5 * NOISE_SCALE * NOISE_REFERENCE_LENGTH / 256
    assert noise.shape == features.shape
    assert noise.abs().max() <= bound
    assert noise.abs().max() > 0.5 * bound


def loss_setup(target, workspace, records, **config_overrides):
    config = make_config(workspace, workspace / "unused", **config_overrides)
    draft = build_draft(config, target, torch.device("cpu"))
    encoder = ConversationEncoder.for_target(target, 512)
    dataset = ConversationDataset(records, encoder, workspace / "images")
    batch = collate([dataset[i] for i in range(len(records))], 0)
    teacher = Teacher(target, DRAFT_DTYPE)(batch)
    return draft, batch, teacher


def test_loss_terms_match_definition(target, workspace):
    draft, batch, teacher = loss_setup(target, workspace, [TEXT_RECORD, ROLE_RECORD])
    input_embeds, features = draft_inputs(teacher, noise=False)
    output = TeacherForcedDraft(draft)(input_embeds, features)[0]
    assert output.shape[:2] == (2, batch.token_ids.shape[1] - 1)
    terms = distillation_loss(draft, output, teacher, target.decoder.logits, batch.assistant_mask)

    counted = loss_positions(batch.assistant_mask)
    assert terms.num_positions == int(counted.sum())
    predicted = draft.next_feature(output[counted])
    expected_feature = F.smooth_l1_loss(predicted, teacher.features[:, 1:][counted])
    target_probs = torch.softmax(target.decoder.logits(teacher.features[:, 1:][counted]), -1)
    expected_ce = -(target_probs * torch.log_softmax(draft.logits(output[counted]), -1)).sum(-1).mean()
    torch.testing.assert_close(terms.feature, expected_feature.detach())
    torch.testing.assert_close(terms.cross_entropy, expected_ce.detach())
    torch.testing.assert_close(terms.total, expected_feature + 0.1 * expected_ce)


def test_loss_ignores_positions_outside_answers(target, workspace):
    draft, batch, teacher = loss_setup(target, workspace, [TEXT_RECORD])
    input_embeds, features = draft_inputs(teacher, noise=False)
    output = TeacherForcedDraft(draft)(input_embeds, features)[0].detach()
    counted = loss_positions(batch.assistant_mask)
    base = distillation_loss(draft, output, teacher, target.decoder.logits, batch.assistant_mask).total

    outside = output.clone()
    outside[~counted] += 5.0
    inside = output.clone()
    inside[counted] += 5.0
    assert distillation_loss(draft, outside, teacher, target.decoder.logits, batch.assistant_mask).total == base
    assert distillation_loss(draft, inside, teacher, target.decoder.logits, batch.assistant_mask).total != base


def test_loss_without_answer_positions_is_zero_with_gradients(target, workspace):
    draft, batch, teacher = loss_setup(target, workspace, [TEXT_RECORD])
    input_embeds, features = draft_inputs(teacher, noise=True)
    output = TeacherForcedDraft(draft)(input_embeds, features)[0]
    terms = distillation_loss(draft, output, teacher, target.decoder.logits, torch.zeros_like(batch.assistant_mask))
    terms.total.backward()
    assert terms.num_positions == 0
    assert terms.total.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in draft.parameters())


@pytest.mark.parametrize("variant", ["eagle", "fspad"])
def test_unrolled_steps_match_drafting(target, workspace, variant):
    """Unrolled step s at position i computes what drafting computes s levels past the context up to i."""
    draft, batch, teacher = loss_setup(target, workspace, [TEXT_RECORD], variant=variant)
    draft.bind_target(target.decoder.embed_tokens, target.decoder.lm_head)
    input_embeds, features = draft_inputs(teacher, noise=False)
    with torch.no_grad():
        first, _, later = TeacherForcedDraft(draft)(input_embeds, features, later_embeds=unrolled_embeds(teacher, 3))
    assert later.shape == (2, *first.shape)

    position = 6  # context 0 .. 6 with target features, then two drafted levels along the data's tokens
    cache = draft.make_cache(1, position + 3)
    slot = torch.zeros(1, dtype=torch.long)

    def run(embeds, step_features, start, prefix, region):
        mask = AttentionMask.build(slot, torch.tensor([start]), torch.tensor([prefix]), region[None])
        positions = torch.arange(start, start + embeds.shape[1])[None]
        with torch.no_grad():
            return draft(embeds, step_features, positions, cache, mask)

    output = run(input_embeds[:, : position + 1], features[:, : position + 1], 0, 0, AttentionMask.causal(position + 1, "cpu"))
    torch.testing.assert_close(output, first[:, : position + 1])
    path = torch.ones(1, 0, dtype=torch.bool)
    for level in range(2):
        feature = draft.next_feature(output[:, -1:])
        embeds = teacher.input_embeds[:, position + 2 + level : position + 3 + level]
        path = torch.cat((path, torch.ones(1, 1, dtype=torch.bool)), dim=1)
        output = run(embeds, feature, position + 1 + level, position + 1, path)
        torch.testing.assert_close(output[:, 0], later[level, :, position], atol=1e-5, rtol=1e-4)


def test_unrolled_steps_train(target, workspace, tmp_path):
    data = tmp_path / "one.json"
    data.write_text(json.dumps([TEXT_RECORD]))
    config = make_config(
        workspace, tmp_path / "out", data=str(data), batch_size=1, max_steps=15, lr=3e-3, noise=False,
        schedule="constant", clip="none", unroll_steps=3, variant="fspad",
    )
    history = DraftTrainer(config, target).run().history
    losses = [step.loss for step in history]
    assert losses[-1] < 0.5 * losses[0]
    assert all(len(step.unrolled_accuracy) == 2 for step in history)
    assert history[-1].unrolled_accuracy[1] > history[0].unrolled_accuracy[1]


def test_unrolled_steps_reject_compressor(target, workspace, tmp_path):
    config = make_config(workspace, tmp_path / "out", unroll_steps=2, compressor="select")
    with pytest.raises(ValueError, match="--unroll-steps 2 does not support a draft with a visual compressor"):
        DraftTrainer(config, target)


@pytest.mark.parametrize("partial_alignment", [False, True])
def test_init_layer_copies_last_target_layer(target, workspace, partial_alignment):
    config = make_config(workspace, workspace / "unused", init_layer="last", partial_alignment=partial_alignment)
    draft = build_draft(config, target, torch.device("cpu"))
    source = target.decoder.layers[-1]
    torch.testing.assert_close(draft.layer.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
    down = draft.layer.mlp.down_proj.weight
    expected = torch.cat((source.mlp.down_proj.weight,) * 2) if partial_alignment else source.mlp.down_proj.weight
    torch.testing.assert_close(down, expected)


# ----- trainer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        {"variant": "fspad"},
        {"feature_sampling": True},
        {"partial_alignment": True},
    ],
    ids=["fspad", "feature_sampling", "partial_alignment"],
)
def test_fspad_variants_train(target, workspace, tmp_path, flags):
    config = make_config(workspace, tmp_path, max_steps=2, **flags)
    result = DraftTrainer(config, target).run()
    saved = json.loads((result.final_draft / "config.json").read_text())
    expected_sampling, expected_alignment = config.draft_variant()
    assert saved["feature_sampling"] == expected_sampling
    assert saved["partial_alignment"] == expected_alignment
    assert all(torch.isfinite(torch.tensor(step.loss)) for step in result.history)
    decoder = target.decoder
    load_draft(result.final_draft, decoder.embed_tokens, decoder.lm_head, target.embedding_fingerprint, torch.float32, "cpu")


def test_steps_on_one_batch_lower_loss(target, workspace, tmp_path):
    data = tmp_path / "one.json"
    data.write_text(json.dumps([TEXT_RECORD]))
    config = make_config(
        workspace, tmp_path / "out", data=str(data), batch_size=1, max_steps=15, lr=3e-3, noise=False,
        schedule="constant", clip="none",
    )
    losses = [step.loss for step in DraftTrainer(config, target).run().history]
    assert losses[-1] < 0.5 * losses[0]
    assert min(losses[-3:]) < min(losses[:3])


def test_checkpoint_round_trip(target, workspace, tmp_path):
    config = make_config(workspace, tmp_path, max_steps=4, save_every=2)
    trainer = DraftTrainer(config, target)
    trainer.run()
    folder = checkpoint_folder(tmp_path, 2)
    state = load_training_state(folder)
    assert state["position"].step == 2
    assert state["position"].micro_batches == 2
    assert (checkpoint_folder(tmp_path, 4) / STATE_NAME).exists()
    decoder = target.decoder
    final = load_draft(tmp_path / "draft", decoder.embed_tokens, decoder.lm_head, target.embedding_fingerprint, torch.float32, "cpu")
    for name, tensor in final.state_dict().items():
        torch.testing.assert_close(tensor, trainer.draft.state_dict()[name], rtol=0, atol=0)


def test_resume_matches_uninterrupted_run(target, workspace, tmp_path):
    whole = DraftTrainer(make_config(workspace, tmp_path / "whole", max_steps=6, save_every=3), target).run()
    resumed_config = make_config(
        workspace, tmp_path / "resumed", max_steps=6, resume=str(checkpoint_folder(tmp_path / "whole", 3))
    )
    resumed = DraftTrainer(resumed_config, target).run()
    assert [step.step for step in resumed.history] == [4, 5, 6]
    assert [step.loss for step in resumed.history] == [step.loss for step in whole.history[3:]]
    whole_weights = load_file(str(whole.final_draft / "model.safetensors"))
    resumed_weights = load_file(str(resumed.final_draft / "model.safetensors"))
    for name, tensor in whole_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


def test_resume_latest_continues_in_place(target, workspace, tmp_path):
    DraftTrainer(make_config(workspace, tmp_path, max_steps=2, save_every=1), target).run()
    result = DraftTrainer(make_config(workspace, tmp_path, max_steps=3, resume="latest"), target).run()
    assert [step.step for step in result.history] == [3]


def test_trainer_skips_bad_records(target, workspace, tmp_path):
    data = tmp_path / "mixed.json"
    records = [IMAGE_RECORD, {"conversations": 7}, {**IMAGE_RECORD, "image": "missing.jpg"}, TEXT_RECORD]
    data.write_text(json.dumps(records))
    result = DraftTrainer(make_config(workspace, tmp_path / "out", data=str(data), max_steps=4), target).run()
    assert sorted(result.skipped) == [1, 2]
    assert len(result.history) == 4


def test_eval_writes_metrics_and_plot(target, workspace, tmp_path):
    config = make_config(
        workspace, tmp_path, max_steps=4, eval_every=2, eval_data=str(workspace / "train.json"),
        eval_samples=2, eval_max_tokens=5,
    )
    DraftTrainer(config, target).run()
    lines = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4]
    for line in lines:
        assert line["mal"] >= 1.0
        assert len(line["acceptance"]) == config.tree_depth
        assert line["eval_prompts"] == 2
        assert line["eval_steps"] > 0
    assert "train_loss" not in lines[0]
    assert "train_loss" in lines[-1]
    assert (tmp_path / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_init_from_continues_a_draft(target, workspace, tmp_path):
    first = DraftTrainer(make_config(workspace, tmp_path / "first", max_steps=1, variant="fspad"), target).run()
    config = make_config(workspace, tmp_path / "second", max_steps=1, lr=1e-12, init_from=str(first.final_draft))
    trainer = DraftTrainer(config, target)
    assert trainer.draft.config.variant == "fspad"
    start = load_file(str(first.final_draft / "model.safetensors"))
    for name, tensor in trainer.draft.state_dict().items():
        assert torch.equal(tensor, start[name]), name


def test_existing_run_needs_resume(target, workspace, tmp_path):
    DraftTrainer(make_config(workspace, tmp_path, max_steps=1), target).run()
    with pytest.raises(ValueError, match="--resume latest"):
        DraftTrainer(make_config(workspace, tmp_path, max_steps=2), target)


def test_text_only_target_trains(workspace, tmp_path):
    text_target = TargetModel(build_tiny_llama(tmp_path / "llama"), dtype="float32", device="cpu")
    config = make_config(workspace, tmp_path / "out", target=str(tmp_path / "llama"), max_steps=2)
    result = DraftTrainer(config, text_target).run()
    assert len(result.history) == 2
    assert list(result.skipped) == [0]  # the image record
    assert "text-only" in result.skipped[0]


# ----- command line --------------------------------------------------------------------


def test_data_files_numbered_in_order(target, workspace, tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.jsonl"
    first.write_text(json.dumps([IMAGE_RECORD, TEXT_RECORD]))
    second.write_text("\n".join(json.dumps(record) for record in [{"conversations": 7}, ROLE_RECORD]) + "\n")
    config = make_config(workspace, tmp_path / "out", data=f"{first}, {second}", max_steps=2)
    assert config.data_files() == [str(first), str(second)]
    trainer = DraftTrainer(config, target)
    assert len(trainer.dataset) == 4
    result = trainer.run()
    assert list(result.skipped) == [2]  # the bad record of the second file, after the first file's two


def test_cli_registers_train_draft(tmp_path):
    args = build_parser().parse_args(["train-draft", "--data", "d.json", "--out", str(tmp_path), "--variant", "fspad"])
    assert args.command == "train-draft"
    assert args.variant == "fspad"
    assert args.lr is None  # unset flags keep TrainingConfig's default


def test_cli_missing_data_file(tmp_path, capsys):
    args = build_parser().parse_args(["train-draft", "--data", str(tmp_path / "none.json"), "--out", str(tmp_path)])
    assert run_train_draft_command(args) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "none.json" in error
    assert "not found" in error


def test_cli_missing_second_data_file(workspace, tmp_path, capsys):
    data = f"{workspace / 'train.json'},{tmp_path / 'other.json'}"
    args = build_parser().parse_args(["train-draft", "--data", data, "--out", str(tmp_path / "out")])
    assert run_train_draft_command(args) == 1
    assert "--data " + str(tmp_path / "other.json") + ": file not found" in capsys.readouterr().err


def test_prompt_only_record_is_eval_prompt(target):
    """A held-out file of prompts without answers still gives evaluation prompts."""
    encoder = ConversationEncoder.for_target(target, 512)
    records = [
        {"conversations": [{"from": "human", "value": "what is the color of the sea"}]},
        {"conversations": [{"from": "human", "value": "is there a cat"}, {"from": "gpt", "value": ""}]},
    ]
    dataset = ConversationDataset(records, encoder, None, "eval")
    for index in range(len(records)):
        prompt = dataset.prompt(index)
        assert prompt is not None
        text = target.tokenizer.decode(prompt.token_ids)
        assert text.rstrip().endswith("assistant")
    assert not dataset.skipped


def test_empty_eval_set_is_an_error(workspace, target, tmp_path):
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "an answer without a prompt"}]}]))
    with pytest.raises(ValueError, match="no usable prompt"):
        DraftTrainer(make_config(workspace, tmp_path / "out", eval_data=str(bad), eval_every=2), target)
