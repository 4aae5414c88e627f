"""`specvlm bench` on tiny random models: every output field, system selection, prompts, load summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from compressors import CompressorConfig
from draft_models.eagle import write_initial_draft
from engine_helpers import run_requests
from server.bench.load import RequestRecord, summarize_level
from server.bench.prompts import load_prompts
from server.bench.systems import build_system_specs, parse_compressor_modes
from server.cli import main
from server.config import ServerConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams
from tiny_models import build_tiny_checkpoint

MAX_TOKENS = 6
REPEATS = 2
TEMPERATURES = [0.0, 1.0]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RESULT_FIELDS = {
    "system", "temperature", "tokens_per_second", "ratio_to_hf", "mal", "ttft_seconds", "model_memory_mib",
    "run_memory_growth_mib", "peak_memory_mib", "output_tokens_per_request", "requests",
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny target and a draft with a select-mode compressor, so every system can run."""
    root = tmp_path_factory.mktemp("bench-tiny")
    target, _ = build_tiny_checkpoint(root)
    write_initial_draft(target, root / "compressor-draft", compressor=CompressorConfig(mode="select"))
    return target, root / "compressor-draft"


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    """Three prompts, one with an image, in the LLaVA format; words from the tiny vocabulary."""
    folder = tmp_path_factory.mktemp("bench-prompts")
    Image.new("RGB", (40, 30), "blue").save(folder / "blue.png")
    records = [
        {"id": "text-0", "conversations": [{"from": "human", "value": "what is the sky"},
                                           {"from": "gpt", "value": "the sky is blue"}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "is a cat big"}]},
        {"id": "image-0", "image": "blue.png",
         "conversations": [{"from": "human", "value": "<image>\nwhat color is this"}, {"from": "gpt", "value": ""}]},
    ]
    path = folder / "prompts.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def offline_run(tiny_checkpoint, prompt_file, tmp_path_factory) -> Path:
    target, draft = tiny_checkpoint
    out = tmp_path_factory.mktemp("bench-out")
    code = main([
        "bench", "--model", str(target), "--draft", str(draft), "--prompts", str(prompt_file),
        "--dtype", "float32", "--device", "cpu", "--max-model-len", "256", "--tree-total-tokens", "4",
        "--max-tokens", str(MAX_TOKENS), "--repeats", str(REPEATS), "--num-prompts", "3",
        "--temperatures", ",".join(f"{t:g}" for t in TEMPERATURES), "--compressor-modes", "select",
        "--prompt-lookup-tokens", "3", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    return out


def test_offline_writes_json_markdown_chart(offline_run):
    assert (offline_run / "results.md").read_text().startswith("## Side-by-side decoding speed")
    assert (offline_run / "chart.png").read_bytes().startswith(PNG_SIGNATURE)
    result = json.loads((offline_run / "results.json").read_text())
    for key in ("kind", "date", "command", "machine", "versions", "settings", "memory_method", "systems", "results"):
        assert key in result, key
    assert result["kind"] == "offline"
    assert result["settings"]["num_image_prompts"] == 1
    assert result["versions"]["torch"]


def test_offline_runs_every_system(offline_run):
    result = json.loads((offline_run / "results.json").read_text())
    names = [system["name"] for system in result["systems"]]
    assert names == ["hf", "hf-prompt-lookup", "plain", "draft", "draft+compressor(select)"]
    trees = {system["name"]: system.get("tree_total_tokens") for system in result["systems"]}
    assert trees["plain"] == 1
    assert trees["draft"] == 4
    assert all(system["model_memory_mib"] > 0 for system in result["systems"])


def test_offline_result_fields(offline_run):
    result = json.loads((offline_run / "results.json").read_text())
    rows = result["results"]
    assert len(rows) == len(result["systems"]) * len(TEMPERATURES)
    for row in rows:
        assert set(row) == RESULT_FIELDS, row["system"]
        assert row["requests"] == REPEATS * 3
        assert row["output_tokens_per_request"] == MAX_TOKENS  # EOS ignored, so every run has full length
        speed = row["tokens_per_second"]
        assert len(speed["runs"]) == REPEATS
        assert speed["min"] <= speed["median"] <= speed["max"]
        assert speed["min"] > 0
        assert row["ratio_to_hf"] > 0
        assert row["mal"] >= 1.0
        assert row["ttft_seconds"]["median"] > 0
        assert row["peak_memory_mib"] >= row["model_memory_mib"]


def test_offline_baseline_and_plain_values(offline_run):
    rows = json.loads((offline_run / "results.json").read_text())["results"]
    for row in rows:
        if row["system"] == "hf":
            assert row["ratio_to_hf"] == pytest.approx(1.0)
        if row["system"] in ("hf", "plain"):
            assert row["mal"] == 1.0


def test_compressor_modes_from_draft_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "eagle", "compressor": {"mode": "weight"}}))
    assert parse_compressor_modes(None, tmp_path) == ["weight"]


def test_compressor_modes_from_the_draft(tiny_checkpoint):
    _, draft = tiny_checkpoint
    assert parse_compressor_modes(None, draft) == ["select"]
    assert parse_compressor_modes(None, draft.parent / "draft") == []  # a draft without a compressor
    assert parse_compressor_modes(None, None) == []


def test_compressor_modes_given_list(tiny_checkpoint):
    _, draft = tiny_checkpoint
    assert parse_compressor_modes("select, concat,select", draft) == ["select", "concat"]
    assert parse_compressor_modes("none", draft) == []


def test_compressor_modes_unknown_rejected():
    with pytest.raises(ValueError, match="unknown compressor mode pool"):
        parse_compressor_modes("select,pool", None)


def test_compressor_system_overrides():
    specs = build_system_specs(["concat"], prompt_lookup_tokens=5)
    by_name = {spec.name: spec for spec in specs}
    assert by_name["draft+compressor(concat)"].settings == {"speculative": True, "draft_compressor": "concat"}
    assert by_name["draft"].settings["draft_compressor"] == "none"
    assert by_name["hf-prompt-lookup"].settings == {"prompt_lookup_num_tokens": 5}


def test_systems_filter_keeps_baseline():
    specs = build_system_specs([], prompt_lookup_tokens=10, only=["plain"])
    assert [spec.name for spec in specs] == ["hf", "plain"]


def test_systems_filter_unknown_name():
    with pytest.raises(ValueError, match="unknown system fast"):
        build_system_specs([], prompt_lookup_tokens=10, only=["plain", "fast"])


def test_load_prompts_cut_and_interleaved(prompt_file):
    prompts = load_prompts(prompt_file)
    assert [prompt.prompt_id for prompt in prompts] == ["text-0", "image-0", "text-1"]
    assert prompts[0].messages == [{"role": "user", "content": "what is the sky"}]
    image_parts = [part for part in prompts[1].messages[0]["content"] if part["type"] == "image"]
    assert len(image_parts) == 1
    assert image_parts[0]["image"].size == (40, 30)


def test_load_prompts_openai_format(prompt_file):
    image_prompt = load_prompts(prompt_file)[1]
    parts = image_prompt.openai_messages()[0]["content"]
    assert parts[0]["type"] == "image_url"
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "what color is this"}


def test_load_prompts_limit_and_text_only(prompt_file):
    assert len(load_prompts(prompt_file, limit=2)) == 2
    assert [prompt.prompt_id for prompt in load_prompts(prompt_file, text_only=True)] == ["text-0", "text-1"]


def test_load_prompts_missing_file(tmp_path):
    with pytest.raises(ValueError, match="prompt file .*missing.json not found"):
        load_prompts(tmp_path / "missing.json")


def test_load_prompts_missing_image(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"image": "gone.png", "conversations": [{"from": "human", "value": "<image> hi"}]}]))
    with pytest.raises(ValueError, match="record 0: image .*gone.png not found"):
        load_prompts(path)


def test_bench_rejects_bad_temperatures(capsys):
    assert main(["bench", "--temperatures", "0,hot"]) == 2
    assert "invalid --temperatures '0,hot'" in capsys.readouterr().err


def test_bench_rejects_zero_repeats(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert "invalid --repeats 0" in capsys.readouterr().err


def test_load_rejects_bad_url(capsys):
    assert main(["bench", "--load", "--url", "127.0.0.1:8000"]) == 2
    assert "invalid --url '127.0.0.1:8000'" in capsys.readouterr().err


def test_ignore_eos_decodes_to_max_tokens(tiny_checkpoint):
    target, _ = tiny_checkpoint
    engine = Engine(ServerConfig(model=str(target), dtype="float32", device="cpu", speculative=False,
                                 max_num_seqs=2, max_model_len=128))
    engine.load()
    # Every token counts as EOS, so a normal request stops after its first token.
    engine.target.eos_token_ids = set(range(engine.target.text_config.vocab_size))
    engine.start(load=False)
    try:
        prompt = engine.prepare([{"role": "user", "content": "what is the sky"}])
        stopped, ignored = run_requests(engine, [
            (prompt, SamplingParams(max_tokens=7, temperature=0.0)),
            (prompt, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)),
        ])
    finally:
        engine.shutdown()
    assert stopped[-1].completion_tokens == 1
    assert stopped[-1].finish_reason == "stop"
    assert ignored[-1].completion_tokens == 7
    assert ignored[-1].finish_reason == "length"


def test_load_summary_counts():
    records = [
        RequestRecord(ok=True, output_tokens=5, ttft_seconds=0.1, latency_seconds=0.5, chunk_gaps=[0.1, 0.1]),
        RequestRecord(ok=True, output_tokens=3, ttft_seconds=0.3, latency_seconds=0.7, chunk_gaps=[0.2]),
        RequestRecord(ok=False, error="HTTP 429"),
        RequestRecord(ok=False, error="HTTP 429"),
        RequestRecord(ok=False, error="ReadTimeout"),
    ]
    level = summarize_level(4, records, seconds=2.0, planned=6)
    assert level["requests_planned"] == 6
    assert level["requests_sent"] == 5
    assert level["requests_completed"] == 2
    assert level["errors"] == {"HTTP 429": 2, "ReadTimeout": 1}
    assert level["output_tokens"] == 8
    assert level["output_tokens_per_second"] == pytest.approx(4.0)
    assert level["ttft_ms"]["p99"] == pytest.approx(300.0)
    assert level["itl_ms"]["p50"] == pytest.approx(100.0)
    # TPOT per request: (0.5 - 0.1) / 4 = 0.1 s and (0.7 - 0.3) / 2 = 0.2 s.
    assert level["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert level["tpot_ms"]["p99"] == pytest.approx(200.0)


def test_load_summary_without_completed_requests():
    level = summarize_level(1, [RequestRecord(ok=False, error="ConnectError")], seconds=1.0, planned=1)
    assert level["requests_completed"] == 0
    assert level["ttft_ms"] is None
    assert level["output_tokens_per_second"] == 0.0


def test_load_summary_response_without_text():
    records = [
        RequestRecord(ok=True, output_tokens=1, ttft_seconds=None, latency_seconds=0.2),
        RequestRecord(ok=True, output_tokens=4, ttft_seconds=0.1, latency_seconds=0.4, chunk_gaps=[0.1]),
    ]
    level = summarize_level(2, records, seconds=1.0, planned=2)
    assert level["requests_completed"] == 2
    assert level["requests_without_text"] == 1
    assert level["output_tokens"] == 5
    assert level["ttft_ms"]["p99"] == pytest.approx(100.0)
    assert level["tpot_ms"]["p50"] == pytest.approx(100.0)


def test_report_without_matplotlib(offline_run, tmp_path, monkeypatch):
    from server.bench import report

    def missing_matplotlib():
        raise RuntimeError("the chart needs matplotlib")

    monkeypatch.setattr(report, "_pyplot", missing_matplotlib)
    result = json.loads((offline_run / "results.json").read_text())
    paths = report.write_report(result, tmp_path / "no-chart")
    assert [path.name for path in paths] == ["results.json", "results.md"]
    assert not (tmp_path / "no-chart" / "chart.png").exists()
    assert (tmp_path / "no-chart" / "results.md").read_text().startswith("## Side-by-side decoding speed")
