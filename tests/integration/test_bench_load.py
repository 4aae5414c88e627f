"""`specvlm bench --load` against a real server process on loopback, serving a tiny random model."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from server.cli import main
from server_process import ServerProcess, free_port
from tiny_models import build_tiny_checkpoint

pytestmark = pytest.mark.integration

NUM_REQUESTS = 5
MAX_TOKENS = 8


def _metric_total(metrics_text: str, name: str) -> float:
    """Sum every sample of a Prometheus counter over its labels."""
    pattern = re.compile(rf"^{name}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(metrics_text))


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-load")
    target, draft = build_tiny_checkpoint(root)
    server = ServerProcess(
        ["--model", str(target), "--draft", str(draft), "--dtype", "float32", "--device", "cpu",
         "--tree-total-tokens", "4", "--max-num-seqs", "2", "--max-model-len", "256", "--log-level", "warning"],
        root / "server.log",
    )
    server.start()
    yield server
    server.stop()


def test_load_mode_counts_requests(tiny_server, tmp_path):
    metrics_before = httpx.get(f"{tiny_server.base_url}/metrics").text
    out = tmp_path / "load"
    code = main([
        "bench", "--load", "--url", tiny_server.base_url, "--concurrency", "1,3",
        "--num-requests", str(NUM_REQUESTS), "--max-tokens", str(MAX_TOKENS), "--num-prompts", "4",
        "--no-progress", "--out", str(out),
    ])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["kind"] == "load"
    assert [level["concurrency"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        assert level["requests_sent"] == NUM_REQUESTS
        assert level["requests_completed"] == NUM_REQUESTS
        assert level["errors"] == {}
        assert 0 < level["output_tokens"] <= NUM_REQUESTS * MAX_TOKENS
        assert level["ttft_ms"]["p50"] > 0
        assert level["output_tokens_per_second"] > 0
    assert (out / "results.md").read_text().startswith("## Serving load")
    assert (out / "chart.png").stat().st_size > 0

    # The server's own counters agree with what the clients counted.
    metrics_after = httpx.get(f"{tiny_server.base_url}/metrics").text
    finished = (_metric_total(metrics_after, "specvlm_request_success_total")
                - _metric_total(metrics_before, "specvlm_request_success_total"))
    tokens = (_metric_total(metrics_after, "specvlm_generation_tokens_total")
              - _metric_total(metrics_before, "specvlm_generation_tokens_total"))
    assert finished == 2 * NUM_REQUESTS
    assert tokens == sum(level["output_tokens"] for level in result["levels"])


def test_load_mode_stops_at_request_bound(tiny_server, tmp_path):
    out = tmp_path / "bounded"
    code = main([
        "bench", "--load", "--url", tiny_server.base_url, "--concurrency", "4", "--num-requests", "2",
        "--max-tokens", "4", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    level = json.loads((out / "results.json").read_text())["levels"][0]
    assert level["requests_sent"] == 2
    assert level["requests_completed"] == 2


def test_load_mode_reports_unreachable_server(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["bench", "--load", "--url", url, "--concurrency", "1", "--num-requests", "1", "--no-progress",
                 "--out", str(tmp_path / "unreachable")])
    assert code == 2
    assert f"GET {url}/v1/models failed" in capsys.readouterr().err
