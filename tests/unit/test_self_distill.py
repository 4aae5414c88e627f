"""`specvlm self-distill` on a tiny random LLaVA: answers equal the engine's greedy output."""

import json

import pytest
from PIL import Image

from engine_helpers import joined, run_requests
from server.cli import build_parser
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams
from server.self_distill import Distiller, InvalidRecordError, Turn, load_dataset, parse_turns, place_images
from tiny_models import build_tiny_llava

MAX_TOKENS = 12
IMAGE_COLOR = (200, 30, 60)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "target")


@pytest.fixture(scope="module")
def engine(target):
    engine = Engine(ServerConfig(
        model=str(target), dtype="float32", device="cpu", max_model_len=256, speculative=False,
        max_num_seqs=2, max_waiting_requests=4,
    ))
    engine.load()
    engine.start(load=False)
    yield engine
    engine.shutdown()


@pytest.fixture
def dataset(tmp_path):
    """A text record, an image record, a two-turn record and two malformed records."""
    Image.new("RGB", (48, 40), IMAGE_COLOR).save(tmp_path / "red.png")
    records = [
        {"id": "text", "conversations": [
            {"from": "human", "value": "what is the color of the sky"},
            {"from": "gpt", "value": "original answer"},
        ]},
        {"id": "image", "image": "red.png", "source": "kept", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in this picture"},
            {"from": "gpt", "value": ""},
        ]},
        {"id": "two-turn", "conversations": [
            {"from": "system", "value": "you are a helpful assistant"},
            {"from": "human", "value": "is the cat big"},
            {"from": "gpt", "value": "old"},
            {"from": "human", "value": "and the dog"},
        ]},
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "hello"}]},
        {"id": "missing-image", "image": "absent.png", "conversations": [{"from": "human", "value": "<image> what"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path, records


def greedy_text(engine, messages) -> str:
    prompt = engine.prepare(messages)
    outputs = run_requests(engine, [(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))])[0]
    return joined(outputs)[0]


def distill(engine, folder, records, done=None):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    distiller = Distiller(engine, folder / "out.json", folder, params, concurrency=4, progress=False)
    stats = distiller.run(records, done)
    return stats, load_dataset(folder / "out.json")


def test_answers_equal_engine_greedy(engine, dataset):
    folder, records = dataset
    stats, output = distill(engine, folder, records)

    assert [record["id"] for record in output] == ["text", "image", "two-turn"]
    assert not list(folder.glob(".out.json.*")), "the temporary file of the atomic write is left over"
    assert stats.generated == 3
    assert stats.skipped == 2
    assert stats.skipped_indices == [3, 4]

    text, image, two_turn = output
    assert text["conversations"][1]["value"], "the tiny model should answer with some words"
    assert text["conversations"][1]["value"] == greedy_text(
        engine, [{"role": "user", "content": "what is the color of the sky"}]
    )

    picture = Image.open(folder / "red.png").convert("RGB")
    assert image["conversations"][1]["value"] == greedy_text(engine, [{"role": "user", "content": [
        {"type": "image", "image": picture}, {"type": "text", "text": "what is in this picture"},
    ]}])
    assert image["source"] == "kept"
    assert image["image"] == "red.png"

    turns = two_turn["conversations"]
    assert [turn["from"] for turn in turns] == ["system", "human", "gpt", "human", "gpt"]
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "is the cat big"}]
    first = greedy_text(engine, messages)
    assert turns[2]["value"] == first
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and the dog"}]
    assert turns[4]["value"] == greedy_text(engine, messages)
    assert stats.turns == 4


def test_resume_skips_done_ids(engine, dataset):
    folder, records = dataset
    earlier = [{"id": "image", "conversations": [{"from": "human", "value": "<image>"},
                                                 {"from": "gpt", "value": "from the earlier run"}]}]
    stats, output = distill(engine, folder, records, done=earlier)

    assert [record["id"] for record in output] == ["text", "image", "two-turn"]
    assert output[1]["conversations"][1]["value"] == "from the earlier run"
    assert stats.resumed == 1
    assert stats.generated == 2
    assert stats.turns == 3


def test_resume_matches_duplicate_ids_in_order(engine, dataset):
    folder, _ = dataset
    records = [{"id": 7, "conversations": [{"from": "human", "value": "the dog"}]}] * 2
    earlier = [{"id": 7, "conversations": [{"from": "human", "value": "the dog"}, {"from": "gpt", "value": "done"}]}]
    stats, output = distill(engine, folder, records, done=earlier)

    assert stats.resumed == 1
    assert stats.generated == 1
    assert output[0]["conversations"][1]["value"] == "done"
    assert output[1]["conversations"][1]["value"] != "done"


@pytest.mark.parametrize("record, reason", [
    ([], "JSON object"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no 'id'"),
    ({"id": 1, "conversations": []}, "conversations"),
    ({"id": 1, "conversations": [{"from": "gpt", "value": "hi"}]}, "no human turn"),
    ({"id": 1, "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "x"}]}, "<image>"),
    ({"id": 1, "conversations": [{"from": "human", "value": 3}]}, "no string 'value'"),
    ({"id": 1, "conversations": [{"from": "human"}]}, "no string 'value'"),
])
def test_parse_turns_rejects(record, reason):
    with pytest.raises(InvalidRecordError, match=reason):
        parse_turns(record)


def test_parse_turns_accepts_role_content():
    record = {"id": 1, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    assert parse_turns(record) == [Turn("user", "hi"), Turn("assistant", "")]


def test_images_without_placeholder_go_first():
    turns = [Turn("user", "describe it"), Turn("assistant", "")]
    place_images(turns, ["picture"])
    assert turns[0].text == "<image>describe it"
    assert turns[0].images == ["picture"]
    assert turns[1].images == []


def test_placeholder_count_mismatch_rejected():
    turns = [Turn("user", "<image> and <image>")]
    with pytest.raises(InvalidRecordError, match="2 <image> placeholders but the record names 1 images"):
        place_images(turns, ["picture"])


def test_role_content_record_keeps_its_style(engine, tmp_path):
    records = [{"id": "chat", "messages": [{"role": "user", "content": "the red car"}]}]
    stats, output = distill(engine, tmp_path, records)

    assert stats.generated == 1
    turns = output[0]["messages"]
    assert turns[0] == {"role": "user", "content": "the red car"}
    assert turns[1]["role"] == "assistant"
    assert turns[1]["content"] == greedy_text(engine, [{"role": "user", "content": "the red car"}])


def test_cli_rejects_existing_output(tmp_path, capsys):
    (tmp_path / "data.json").write_text("[]")
    (tmp_path / "out.json").write_text("[]")
    args = build_parser().parse_args(
        ["self-distill", "--data", str(tmp_path / "data.json"), "--out", str(tmp_path / "out.json")]
    )
    assert args.handler(args) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_cli_runs_and_resumes(target, dataset, capsys):
    folder, _ = dataset
    command = ["self-distill", "--data", str(folder / "data.json"), "--out", str(folder / "cli.json"),
               "--model", str(target), "--dtype", "float32", "--device", "cpu", "--max-tokens", str(MAX_TOKENS),
               "--max-num-seqs", "2", "--no-progress"]
    args = build_parser().parse_args(command)
    assert args.handler(args) == 0
    first = load_dataset(folder / "cli.json")
    assert [record["id"] for record in first] == ["text", "image", "two-turn"]
    assert "3 records generated, 0 kept from the earlier output, 2 skipped" in capsys.readouterr().err

    args = build_parser().parse_args(command + ["--resume"])
    assert args.handler(args) == 0
    assert load_dataset(folder / "cli.json") == first
    assert "0 records generated, 3 kept from the earlier output, 2 skipped" in capsys.readouterr().err
