"""A real Prometheus scrapes a real server on loopback, and the series come back through
Prometheus's HTTP API.

The server serves a tiny random checkpoint, so the test needs no demo model. Prometheus
and promtool come from Debian's `prometheus` package; without them the tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from server_process import HOST, ServerProcess, free_port, stop_process
from tiny_models import build_tiny_checkpoint

pytestmark = pytest.mark.integration

SCRAPE_INTERVAL_SECONDS = 1
PROMETHEUS_READY_TIMEOUT_SECONDS = 60.0
QUERY_TIMEOUT_SECONDS = 60.0


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        # CI installs Prometheus, so a missing one there is a broken setup, not a skip.
        report = pytest.fail if os.environ.get("CI") == "true" else pytest.skip
        report(f"{name} is not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("scrape")
    target, draft = build_tiny_checkpoint(root / "checkpoint")
    # A fixed tree size skips the start-up timing, which only slows this test down.
    process = ServerProcess(
        ["--model", str(target), "--draft", str(draft), "--tree-total-tokens", "8", "--device", "cpu"],
        root / "server.log",
    )
    process.start()
    yield process
    process.stop()


class PrometheusProcess:
    """A `prometheus` child process on a free loopback port that scrapes one target."""

    def __init__(self, scrape_target: str, folder: Path):
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.log_path = folder / "prometheus.log"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s"},
            "scrape_configs": [{"job_name": "specvlm", "static_configs": [{"targets": [scrape_target]}]}],
        }
        config_path = folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.command = [
            require_tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start Prometheus and wait until GET /-/ready returns 200."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + PROMETHEUS_READY_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with code {self.process.returncode}.\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/-/ready", timeout=5.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus was not ready within {PROMETHEUS_READY_TIMEOUT_SECONDS:.0f} s.\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        stop_process(self.process)

    def query(self, expression: str) -> list[dict]:
        """Return the result vector of an instant query."""
        response = httpx.get(f"{self.base_url}/api/v1/query", params={"query": expression}, timeout=10.0)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    def wait_for_value(self, expression: str, expected: float) -> list[dict]:
        """Query until the one series of `expression` has the value `expected`; return the last result."""
        deadline = time.monotonic() + QUERY_TIMEOUT_SECONDS
        while True:
            result = self.query(expression)
            if len(result) == 1 and float(result[0]["value"][1]) == expected:
                return result
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{expression} did not reach {expected} within {QUERY_TIMEOUT_SECONDS:.0f} s; "
                    f"last result: {result}.\n{self.log_tail()}"
                )
            time.sleep(SCRAPE_INTERVAL_SECONDS / 2)

    def log_tail(self) -> str:
        return f"--- prometheus log ({self.log_path}) ---\n{self.log_path.read_text(errors='replace')[-4000:]}"


@pytest.fixture
def prometheus(server: ServerProcess, tmp_path: Path) -> Iterator[PrometheusProcess]:
    process = PrometheusProcess(f"{HOST}:{server.port}", tmp_path)
    process.start()
    yield process
    process.stop()


def test_metrics_endpoint_passes_promtool(server: ServerProcess):
    promtool = require_tool("promtool")
    response = httpx.get(f"{server.base_url}/metrics", timeout=10.0)
    assert response.status_code == 200
    assert "specvlm_num_requests_waiting" in response.text

    result = subprocess.run([promtool, "check", "metrics"], input=response.content, capture_output=True)

    assert result.returncode == 0, f"promtool check metrics:\n{result.stdout.decode()}{result.stderr.decode()}"


def test_prometheus_scrapes_server(server: ServerProcess, prometheus: PrometheusProcess):
    (up,) = prometheus.wait_for_value('up{job="specvlm"}', 1.0)
    assert up["metric"]["instance"] == f"{HOST}:{server.port}"

    waiting = prometheus.query('specvlm_num_requests_waiting{job="specvlm"}')
    assert len(waiting) == 1
    assert waiting[0]["metric"]["model_name"] == "target"

    before = prometheus.query('specvlm_generation_tokens_total{job="specvlm"}')
    assert len(before) == 1
    tokens_before = float(before[0]["value"][1])
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": "target", "messages": [{"role": "user", "content": "what is the cat"}],
              "max_tokens": 6, "temperature": 0},
        timeout=120.0,
    )
    assert response.status_code == 200, response.text
    completion_tokens = response.json()["usage"]["completion_tokens"]
    assert completion_tokens > 0

    prometheus.wait_for_value('specvlm_generation_tokens_total{job="specvlm"}', tokens_before + completion_tokens)
