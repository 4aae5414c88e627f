"""Graceful shutdown of a real `specvlm serve` process on the tiny random checkpoint.

A client keeps a request open by sending its body in two parts, which keeps the
request running for as long as the test needs, without depending on how fast the
model is. SIGTERM then has to drain: /health and new requests get 503 while the held
request is still served in full, and the process exits with code 0.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from server_process import HOST, ServerProcess
from tiny_models import build_tiny_checkpoint

pytestmark = pytest.mark.integration

EXIT_TIMEOUT_SECONDS = 60
DRAIN_POLL_SECONDS = 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def start_server(checkpoint: tuple[Path, Path], log_path: Path, grace_seconds: float) -> ServerProcess:
    target, draft = checkpoint
    server = ServerProcess(
        [
            "--model", str(target), "--draft", str(draft), "--dtype", "float32", "--device", "cpu",
            "--max-model-len", "256", "--tree-total-tokens", "8",
            "--shutdown-grace-seconds", str(grace_seconds),
        ],
        log_path,
    )
    server.start()
    return server


def wait_for_exit(server: ServerProcess) -> int:
    assert server.process is not None
    try:
        return server.process.wait(timeout=EXIT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        server.stop()
        pytest.fail(f"the server did not exit within {EXIT_TIMEOUT_SECONDS} s of SIGTERM.\n{server.log_tail()}")


def test_sigterm_when_idle_exits_zero(checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    server = start_server(checkpoint, tmp_path / "server.log", grace_seconds=30)
    assert server.process is not None

    server.process.send_signal(signal.SIGTERM)

    assert wait_for_exit(server) == 0, server.log_tail()
    assert "server stopped" in server.log_path.read_text()


def test_sigterm_drains_running_request(checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    server = start_server(checkpoint, tmp_path / "server.log", grace_seconds=120)
    assert server.process is not None
    body = json.dumps(
        {"messages": [{"role": "user", "content": "is there a cat"}], "max_tokens": 8, "temperature": 0, "stream": True}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{server.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()

    try:
        with socket.create_connection((HOST, server.port), timeout=30) as held, httpx.Client(
            base_url=server.base_url, timeout=10
        ) as client:
            held.sendall(head + body[:10])
            # The server reads connections in arrival order, so once this response is
            # back, it has started the held request and counts it as running.
            assert client.get("/version").status_code == 200

            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + DRAIN_POLL_SECONDS
            health = client.get("/health")
            while health.status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
                health = client.get("/health")
            assert health.status_code == 503, health.text
            assert health.json()["error"]["code"] == "server_shutting_down"

            rejected = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert rejected.status_code == 503, rejected.text
            assert rejected.json()["error"]["code"] == "server_shutting_down"
            assert server.process.poll() is None

            held.settimeout(30)
            held.sendall(body[10:])
            response = b""
            while chunk := held.recv(65536):
                response += chunk
    finally:
        exit_code = wait_for_exit(server)

    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert b"data: [DONE]" in response
    assert re.search(rb'"finish_reason":"(stop|length)"', response), response[-500:]
    assert exit_code == 0, server.log_tail()
