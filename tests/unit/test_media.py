"""Image sources beyond data URLs: http(s) fetching, the address check, and local files.

Every server here is a `ThreadingHTTPServer` of the test's own on 127.0.0.1. The server
rejects loopback by design, so tests that fetch from it pass a `MediaPolicy` whose
`address_check` allows loopback only, a hook that no setting exposes. Tests of denied
addresses replace socket connect with a function that fails the test, to show that
the address is rejected before any connection is attempted.
"""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fake_engine import FakeEngine
from server.api.app import create_app
from server.api.errors import APIError
from server.api.media import MediaPolicy, fetch_http_image, is_domain_allowed, non_public_reason, read_local_image
from server.config import ServerConfig
from server.metrics import Metrics

PARAM = "messages[0].content[1].image_url"
MAX_BYTES = 64 * 1024


def png_bytes(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def loopback_only(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    return None if address.is_loopback else "not loopback"


def fail_on_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every outgoing TCP connection fail the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Answer getaddrinfo from `answers`, so that no DNS query leaves the machine; return the names looked up."""
    looked_up: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple]:
        looked_up.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        results = []
        for address in answers[host]:
            if ":" in address:
                results.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                results.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return results

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


# Address classification


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "100.64.0.1",
        "192.0.2.10",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        "2002:7f00:1::1",
        "2001:db8::1",
    ],
)
def test_non_public_address_rejected(address: str) -> None:
    assert non_public_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_address_accepted(address: str) -> None:
    assert non_public_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("images.example.com", True),
        ("cdn.example.net", True),
        ("a.b.cdn.example.net", True),
        ("example.net", False),
        ("evilexample.net", False),
        ("images.example.com.evil.org", False),
        ("example.com", False),
    ],
)
def test_domain_allowlist_matching(host: str, allowed: bool) -> None:
    assert is_domain_allowed(host, ("images.example.com", "*.example.net")) is allowed


# Denied hosts and addresses: nothing is sent


def test_unlisted_host_rejected_before_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on_connect(monkeypatch)
    looked_up = fake_resolver(monkeypatch, {})
    policy = MediaPolicy(max_image_bytes=MAX_BYTES, allowed_domains=("images.example.com",))

    with pytest.raises(APIError) as caught:
        fetch_http_image("http://other.example.com/cat.png", PARAM, policy)

    assert caught.value.status_code == 400
    assert caught.value.code == "image_url_not_allowed"
    assert looked_up == []


def test_private_address_literal_rejected_without_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on_connect(monkeypatch)
    policy = MediaPolicy(max_image_bytes=MAX_BYTES, allowed_domains=("10.0.0.1",))

    with pytest.raises(APIError) as caught:
        fetch_http_image("http://10.0.0.1/cat.png", PARAM, policy)

    assert caught.value.status_code == 400
    assert caught.value.code == "image_url_not_allowed"
    assert "a private address" in caught.value.message


@pytest.mark.parametrize(
    "addresses",
    [["10.0.0.1"], ["127.0.0.1"], ["169.254.169.254"], ["::ffff:127.0.0.1"], ["8.8.8.8", "192.168.0.7"]],
)
def test_host_resolving_to_denied_address_rejected(monkeypatch: pytest.MonkeyPatch, addresses: list[str]) -> None:
    fail_on_connect(monkeypatch)
    fake_resolver(monkeypatch, {"images.example.com": addresses})
    policy = MediaPolicy(max_image_bytes=MAX_BYTES, allowed_domains=("images.example.com",))

    with pytest.raises(APIError) as caught:
        fetch_http_image("https://images.example.com/cat.png", PARAM, policy)

    assert caught.value.status_code == 400
    assert caught.value.code == "image_url_not_allowed"
    assert "public addresses only" in caught.value.message


def test_unresolvable_host_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on_connect(monkeypatch)
    fake_resolver(monkeypatch, {})
    policy = MediaPolicy(max_image_bytes=MAX_BYTES, allowed_domains=("images.example.com",))

    with pytest.raises(APIError) as caught:
        fetch_http_image("http://images.example.com/cat.png", PARAM, policy)

    assert caught.value.status_code == 400
    assert caught.value.code == "image_fetch_failed"


@pytest.mark.parametrize("url", ["http://user:secret@images.example.com/a.png", "http://images.example.com:99999/a.png"])
def test_malformed_http_url_rejected(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    fail_on_connect(monkeypatch)
    policy = MediaPolicy(max_image_bytes=MAX_BYTES, allowed_domains=("images.example.com",))

    with pytest.raises(APIError) as caught:
        fetch_http_image(url, PARAM, policy)

    assert caught.value.status_code == 400


# Fetching from a local server


@dataclasses.dataclass
class ImageServer:
    """A loopback HTTP server with a few routes, recording the requests it received."""

    port: int
    requests: list[tuple[str, str]]  # (path, Host header)
    release: threading.Event  # lets the slow route return

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    requests: list[tuple[str, str]] = []
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            requests.append((self.path, self.headers.get("Host", "")))
            if self.path == "/cat.png":
                self.send_body(PNG)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/big-declared":
                self.send_body(b"\x00" * (MAX_BYTES + 1))
            elif self.path == "/big-undeclared":
                # No Content-Length: the body ends when the connection closes.
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(MAX_BYTES // 4096 + 2):
                    self.wfile.write(b"\x00" * 4096)
            elif self.path == "/slow":
                release.wait(timeout=30)
                self.send_body(PNG)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def send_body(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ImageServer(server.server_address[1], requests, release)
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def loopback_policy(**overrides: Any) -> MediaPolicy:
    settings: dict[str, Any] = dict(
        max_image_bytes=MAX_BYTES, allowed_domains=("127.0.0.1",), fetch_timeout=5.0, address_check=loopback_only
    )
    settings.update(overrides)
    return MediaPolicy(**settings)


def test_fetch_returns_image_bytes(image_server: ImageServer) -> None:
    data = fetch_http_image(image_server.url("/cat.png"), PARAM, loopback_policy())

    assert data == PNG
    assert image_server.requests == [("/cat.png", f"127.0.0.1:{image_server.port}")]


def test_fetch_connects_to_the_checked_address(monkeypatch: pytest.MonkeyPatch, image_server: ImageServer) -> None:
    # The name resolves once, and the request carries the name in its Host header.
    looked_up = fake_resolver(monkeypatch, {"images.test": ["127.0.0.1"]})
    policy = loopback_policy(allowed_domains=("images.test",))

    data = fetch_http_image(image_server.url("/cat.png", host="images.test"), PARAM, policy)

    assert data == PNG
    assert looked_up == ["images.test"]
    assert image_server.requests == [("/cat.png", f"images.test:{image_server.port}")]


def test_default_policy_rejects_loopback_server(image_server: ImageServer) -> None:
    policy = MediaPolicy(max_image_bytes=MAX_BYTES, allowed_domains=("127.0.0.1",))

    with pytest.raises(APIError) as caught:
        fetch_http_image(image_server.url("/cat.png"), PARAM, policy)

    assert caught.value.code == "image_url_not_allowed"
    assert "a loopback address" in caught.value.message
    assert image_server.requests == []


def test_redirect_not_followed(image_server: ImageServer) -> None:
    with pytest.raises(APIError) as caught:
        fetch_http_image(image_server.url("/redirect"), PARAM, loopback_policy())

    assert caught.value.status_code == 400
    assert "Redirects are not followed" in caught.value.message
    assert [path for path, _ in image_server.requests] == ["/redirect"]


def test_http_error_status_rejected(image_server: ImageServer) -> None:
    with pytest.raises(APIError) as caught:
        fetch_http_image(image_server.url("/missing.png"), PARAM, loopback_policy())

    assert caught.value.status_code == 400
    assert caught.value.code == "image_fetch_failed"
    assert "HTTP 404" in caught.value.message


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared"])
def test_fetch_over_byte_limit_is_413(image_server: ImageServer, path: str) -> None:
    with pytest.raises(APIError) as caught:
        fetch_http_image(image_server.url(path), PARAM, loopback_policy())

    assert caught.value.status_code == 413
    assert caught.value.code == "image_too_large"
    assert "--max-image-bytes" in caught.value.message


def test_fetch_timeout_rejected(image_server: ImageServer) -> None:
    with pytest.raises(APIError) as caught:
        fetch_http_image(image_server.url("/slow"), PARAM, loopback_policy(fetch_timeout=0.3))

    assert caught.value.status_code == 400
    assert caught.value.code == "image_fetch_timeout"
    assert "--media-fetch-timeout" in caught.value.message


def test_connection_refused_rejected() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens on it once the probe closes

    with pytest.raises(APIError) as caught:
        fetch_http_image(f"http://127.0.0.1:{port}/cat.png", PARAM, loopback_policy())

    assert caught.value.status_code == 400
    assert caught.value.code == "image_fetch_failed"


def test_chat_request_with_fetched_image(image_server: ImageServer, engine: FakeEngine) -> None:
    config = ServerConfig(api_key=None, allowed_media_domains=["127.0.0.1"])
    app = create_app(config, engine, Metrics(engine.model_name))
    app.state.media_policy = dataclasses.replace(app.state.media_policy, address_check=loopback_only)
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": image_server.url("/cat.png")}}],
    }

    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={"messages": [message]})

    assert response.status_code == 200, response.text
    image = engine.prepared[0][0]["content"][1]["image"]
    assert image.size == (8, 8)


def test_chat_request_with_loopback_url_rejected(image_server: ImageServer, engine: FakeEngine) -> None:
    config = ServerConfig(api_key=None, allowed_media_domains=["127.0.0.1"])
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_server.url("/cat.png")}}]}

    with TestClient(create_app(config, engine, Metrics(engine.model_name))) as client:
        response = client.post("/v1/chat/completions", json={"messages": [message]})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "image_url_not_allowed"
    assert image_server.requests == []


# Local files


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    (root / "cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return root


def local_policy(root: Path, **overrides: Any) -> MediaPolicy:
    return MediaPolicy(max_image_bytes=overrides.get("max_image_bytes", MAX_BYTES), local_root=root.resolve())


def test_local_path_under_root_read(media_root: Path) -> None:
    assert read_local_image(str(media_root / "cat.png"), PARAM, local_policy(media_root)) == PNG


def test_file_url_under_root_read(media_root: Path) -> None:
    (media_root / "a cat.png").write_bytes(PNG)
    url = "file://" + str(media_root / "a%20cat.png")

    assert read_local_image(url, PARAM, local_policy(media_root)) == PNG


def test_local_paths_disabled_by_default(media_root: Path) -> None:
    with pytest.raises(APIError) as caught:
        read_local_image(str(media_root / "cat.png"), PARAM, MediaPolicy(max_image_bytes=MAX_BYTES))

    assert caught.value.status_code == 400
    assert "--allowed-local-media-path" in caught.value.message


@pytest.mark.parametrize("relative", ["../secret.png", "./../media/../secret.png"])
def test_dot_dot_escape_rejected(media_root: Path, relative: str) -> None:
    with pytest.raises(APIError) as caught:
        read_local_image(f"{media_root}/{relative}", PARAM, local_policy(media_root))

    assert caught.value.status_code == 400
    assert caught.value.code == "image_url_not_allowed"


def test_symlink_out_of_root_rejected(media_root: Path) -> None:
    (media_root / "link.png").symlink_to(media_root.parent / "secret.png")

    with pytest.raises(APIError) as caught:
        read_local_image(str(media_root / "link.png"), PARAM, local_policy(media_root))

    assert caught.value.code == "image_url_not_allowed"


def test_symlink_within_root_read(media_root: Path) -> None:
    (media_root / "alias.png").symlink_to(media_root / "cat.png")

    assert read_local_image(str(media_root / "alias.png"), PARAM, local_policy(media_root)) == PNG


def test_outside_root_error_hides_existence(media_root: Path) -> None:
    with pytest.raises(APIError) as outside:
        read_local_image(str(media_root.parent / "nothing.png"), PARAM, local_policy(media_root))
    with pytest.raises(APIError) as inside:
        read_local_image(str(media_root / "nothing.png"), PARAM, local_policy(media_root))

    assert outside.value.code == "image_url_not_allowed"
    assert inside.value.code == "image_not_found"


def test_fifo_rejected_without_blocking(media_root: Path) -> None:
    os.mkfifo(media_root / "pipe.png")

    with pytest.raises(APIError) as caught:
        read_local_image(str(media_root / "pipe.png"), PARAM, local_policy(media_root))

    assert "not a regular file" in caught.value.message


def test_local_file_over_byte_limit_is_413(media_root: Path) -> None:
    with pytest.raises(APIError) as caught:
        read_local_image(str(media_root / "cat.png"), PARAM, local_policy(media_root, max_image_bytes=len(PNG) - 1))

    assert caught.value.status_code == 413
    assert "--max-image-bytes" in caught.value.message


def test_remote_file_url_rejected(media_root: Path) -> None:
    with pytest.raises(APIError) as caught:
        read_local_image("file://fileserver/share/cat.png", PARAM, local_policy(media_root))

    assert caught.value.status_code == 400


def test_chat_request_with_local_file(media_root: Path, engine: FakeEngine) -> None:
    config = ServerConfig(api_key=None, allowed_local_media_path=str(media_root))
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(media_root / "cat.png")}}]}

    with TestClient(create_app(config, engine, Metrics(engine.model_name))) as client:
        response = client.post("/v1/chat/completions", json={"messages": [message]})

    assert response.status_code == 200, response.text
    assert engine.prepared[0][0]["content"][0]["image"].size == (8, 8)


def test_allowed_local_media_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an existing folder"):
        ServerConfig(allowed_local_media_path=str(tmp_path / "missing"))
