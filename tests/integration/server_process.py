"""Run `specvlm serve` as a child process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

HOST = "127.0.0.1"
STARTUP_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 15.0
LOG_TAIL_CHARS = 6000


def free_port() -> int:
    """Return a TCP port that was free on the loopback interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """A `python -m server.cli serve` child process, with its output written to `log_path`.

    Every `SPECVLM_*` variable is removed from the child's environment, so that only
    the flags passed here configure it.
    """

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "server.cli", "serve", "--host", HOST, "--port", str(self.port), *args]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Start the process and wait until GET /health returns 200.

        Fails the test with the end of the server log when the process exits or is not
        ready within `timeout` seconds.
        """
        environment = {key: value for key, value in os.environ.items() if not key.startswith("SPECVLM_")}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=Path(__file__).parents[2]
            )

        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while True:
                exit_code = self.process.poll()
                if exit_code is not None:
                    pytest.fail(f"the server exited with code {exit_code} before it was ready.\n{self.log_tail()}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"the server was not ready within {timeout:.0f} s.\n{self.log_tail()}")
                time.sleep(0.25)

    def stop(self) -> None:
        stop_process(self.process)

    def log_tail(self) -> str:
        """Return the end of the server log, for failure messages."""
        text = self.log_path.read_text(errors="replace")
        return f"--- server log ({self.log_path}), last {LOG_TAIL_CHARS} characters ---\n{text[-LOG_TAIL_CHARS:]}"


def stop_process(process: subprocess.Popen | None) -> None:
    """Terminate a child process, and kill it if it is still running after `STOP_TIMEOUT_SECONDS`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
