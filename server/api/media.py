"""Image bytes from http(s) URLs and local files, within the server's media settings.

http(s): only hosts named in `allowed_media_domains` are fetched. The host is resolved
once, every address it resolves to is checked, and the connection goes to a checked
address, so a DNS answer that changes between check and connect (DNS rebinding) cannot
reach an internal address. Loopback, private, link-local, multicast, reserved,
unspecified and other non-public addresses are rejected, including IPv4 addresses
inside IPv6 (IPv4-mapped, NAT64, 6to4, Teredo). Redirects are not followed, the whole
fetch has one deadline, and the body is read in chunks and abandoned once it is over
`max_image_bytes`.

Local files: an absolute path or a `file://` URL, read only when its real path, with
symlinks and `..` resolved, lies under `allowed_local_media_path`.

Both are blocking and run in a worker thread. Errors are APIErrors that name the
content part: 400 for rejected or failed sources, 413 for files over the byte limit.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from server import __version__
from server.api.errors import APIError
from server.config import ServerConfig

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

READ_CHUNK_BYTES = 64 * 1024
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


def non_public_reason(address: IPAddress) -> str | None:
    """Return why `address` must not be fetched from, such as "a loopback address", or None if it is public.

    An IPv4-mapped IPv6 address is judged by its IPv4 address alone. Other IPv6
    addresses that carry an IPv4 address (NAT64, 6to4 and Teredo) are judged by that
    IPv4 address too.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        reason = non_public_reason(address.ipv4_mapped)
        return None if reason is None else f"{reason} inside an IPv6 address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.sixtofour]
        if address in _NAT64_PREFIX:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.teredo is not None:
            embedded.extend(address.teredo)
        for inner in embedded:
            if inner is not None and (reason := non_public_reason(inner)) is not None:
                return f"{reason} inside an IPv6 address"
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    )
    for attribute, reason in checks:
        if getattr(address, attribute):
            return reason
    if not address.is_global:
        return "a non-public address"
    return None


@dataclass(frozen=True)
class MediaPolicy:
    """The image sources and the byte limit that the server's settings allow."""

    max_image_bytes: int
    allowed_domains: tuple[str, ...] = ()
    local_root: Path | None = None  # already resolved
    fetch_timeout: float = 10.0  # seconds for one http(s) image, from resolution to the last byte
    # Returns why an address is rejected, or None. No setting changes it: only tests
    # replace it, to fetch from a server of their own on loopback.
    address_check: Callable[[IPAddress], str | None] = non_public_reason

    @classmethod
    def from_config(cls, config: ServerConfig) -> MediaPolicy:
        root = Path(config.allowed_local_media_path).resolve() if config.allowed_local_media_path else None
        return cls(
            max_image_bytes=config.max_image_bytes,
            allowed_domains=tuple(config.allowed_media_domains),
            local_root=root,
            fetch_timeout=config.media_fetch_timeout,
        )


def too_large(param: str, size: str, limit: int) -> APIError:
    """Return the 413 error for an image file over `max_image_bytes`."""
    return APIError(
        413,
        f"'{param}' is {size}, over the limit of {limit} bytes per image. "
        "Send a smaller file or raise --max-image-bytes (SPECVLM_MAX_IMAGE_BYTES) on the server.",
        param=param,
        code="image_too_large",
    )


def _rejected(param: str, message: str, code: str = "invalid_image_url") -> APIError:
    return APIError(400, f"'{param}': {message}", param=param, code=code)


# ----- http(s) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # lower-case ASCII, IPv6 without brackets
    port: int
    path: str  # path and query, as sent in the request line


def _parse_http_url(url: str, param: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _rejected(param, f"the URL is not valid ({exc}).") from exc
    if parts.username is not None or parts.password is not None:
        raise _rejected(param, "image URLs with a user name or password are not accepted. Remove them from the URL.")
    if not parts.hostname:
        raise _rejected(param, "the URL has no host.")
    try:
        host = str(ipaddress.ip_address(parts.hostname))
    except ValueError:
        try:
            host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise _rejected(param, f"the URL's host is not a valid host name ({exc}).") from exc
    scheme = parts.scheme.lower()
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(char in path for char in "\r\n\x00 "):
        raise _rejected(param, "the URL's path contains spaces or control characters. Percent-encode them.")
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def is_domain_allowed(host: str, allowed_domains: tuple[str, ...]) -> bool:
    """Return whether `host` is listed, exactly or under a `*.` entry (which excludes the bare domain)."""
    for entry in allowed_domains:
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


def resolve_checked_addresses(host: str, port: int, param: str, policy: MediaPolicy) -> list[str]:
    """Resolve `host` and return its addresses, or raise a 400 if any of them is rejected.

    One rejected address rejects the host, so that a DNS answer that mixes public and
    internal addresses cannot reach the internal one.
    """
    # NOTE: getaddrinfo has no timeout of its own, so resolution takes as long as the
    # system resolver allows (resolv.conf), outside media_fetch_timeout.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise _rejected(param, f"the host {host!r} could not be resolved ({exc}).", "image_fetch_failed") from exc

    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]
        reason = policy.address_check(ipaddress.ip_address(text))
        if reason is not None:
            logger.warning("rejected image URL of %s: host %s resolves to %s, %s", param, host, text, reason)
            raise _rejected(
                param,
                f"the host {host!r} resolves to {reason}. Images are fetched from public addresses only.",
                "image_url_not_allowed",
            )
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise _rejected(param, f"the host {host!r} has no address.", "image_fetch_failed")
    return addresses


def _open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """Connect to a numeric address, so that no name resolution happens here."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection for `host` that connects to an address checked beforehand."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = _open_socket(self.address, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection for `host` that connects to an address checked beforehand.

    The certificate is verified against `host`, which is also sent as SNI.
    """

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.tls_context = context

    def connect(self) -> None:
        sock = _open_socket(self.address, self.port, self.timeout)
        try:
            self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def fetch_http_image(url: str, param: str, policy: MediaPolicy) -> bytes:
    """Download the image at an http(s) URL within the policy and return its bytes."""
    target = _parse_http_url(url, param)
    if not is_domain_allowed(target.host, policy.allowed_domains):
        allowed = ", ".join(policy.allowed_domains) if policy.allowed_domains else "none"
        raise _rejected(
            param,
            f"fetching images from {target.host!r} is not allowed (allowed hosts: {allowed}). Send the image as a "
            "data URL, or add the host to --allowed-media-domains (SPECVLM_ALLOWED_MEDIA_DOMAINS) on the server.",
            "image_url_not_allowed",
        )
    deadline = time.monotonic() + policy.fetch_timeout
    addresses = resolve_checked_addresses(target.host, target.port, param, policy)

    last_error: OSError | None = None
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            return _download(target, address, param, policy, deadline)
        except ConnectionRefusedError as exc:  # try the host's next address
            last_error = exc
        except _Timeout:
            break
    if last_error is not None:
        raise _rejected(param, f"connecting to {target.host!r} failed ({last_error}).", "image_fetch_failed")
    raise _timed_out(param, target.host, policy.fetch_timeout)


class _Timeout(Exception):
    pass


def _timed_out(param: str, host: str, timeout: float) -> APIError:
    return _rejected(
        param,
        f"fetching the image from {host!r} timed out after {timeout:g} s. Send the image as a data URL, or raise "
        "--media-fetch-timeout (SPECVLM_MEDIA_FETCH_TIMEOUT) on the server.",
        "image_fetch_timeout",
    )


def _download(target: _Target, address: str, param: str, policy: MediaPolicy, deadline: float) -> bytes:
    """GET the target from one address; raise ConnectionRefusedError or _Timeout to try the next or stop."""
    timeout = max(deadline - time.monotonic(), 0.001)
    if target.scheme == "https":
        connection: http.client.HTTPConnection = _PinnedHTTPSConnection(
            target.host, target.port, address, timeout, ssl.create_default_context()
        )
    else:
        connection = _PinnedHTTPConnection(target.host, target.port, address, timeout)

    # A socket timeout bounds each blocking call, not their sum, so a server that sends
    # a byte now and then could hold the thread for long. The watchdog shuts the socket
    # down at the deadline, which ends any read in progress.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        data = _read_response(connection, target, param, policy.max_image_bytes)
    except ConnectionRefusedError:
        raise
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or isinstance(exc, TimeoutError):
            raise _Timeout from exc
        raise _rejected(param, f"fetching the image from {target.host!r} failed ({exc}).", "image_fetch_failed") from exc
    except APIError:
        if expired.is_set():
            raise _Timeout from None
        raise
    finally:
        watchdog.cancel()
        connection.close()
    if expired.is_set():  # a body that ends with the connection may have been cut short by the watchdog
        raise _Timeout
    return data


def _read_response(connection: http.client.HTTPConnection, target: _Target, param: str, max_bytes: int) -> bytes:
    connection.request("GET", target.path, headers={"Accept": "image/*", "User-Agent": f"specvlm/{__version__}"})
    response = connection.getresponse()
    if 300 <= response.status < 400:
        location = response.getheader("Location", "no Location header")
        raise _rejected(
            param,
            f"{target.host!r} answered with a redirect (HTTP {response.status} to {location[:200]}). "
            "Redirects are not followed. Send the final URL.",
            "image_fetch_failed",
        )
    if response.status != 200:
        raise _rejected(
            param, f"{target.host!r} answered with HTTP {response.status} {response.reason}.", "image_fetch_failed"
        )

    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(param, f"{int(declared)} bytes (Content-Length)", max_bytes)
    data = bytearray()
    while chunk := response.read(READ_CHUNK_BYTES):
        data += chunk
        if len(data) > max_bytes:
            raise too_large(param, f"over {max_bytes} bytes", max_bytes)
    if declared is not None and declared.isdigit() and len(data) < int(declared):
        raise _rejected(
            param,
            f"{target.host!r} closed the connection after {len(data)} of {int(declared)} bytes.",
            "image_fetch_failed",
        )
    return bytes(data)


# ----- local files ------------------------------------------------------------------------


def _local_path(url: str, param: str) -> str:
    if url.startswith("/"):
        return url
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _rejected(param, f"file URLs must name a local file (file:///path), not host {parts.netloc!r}.")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise _rejected(param, "file URLs must have an absolute path, such as file:///images/cat.png.")
    return path


def read_local_image(url: str, param: str, policy: MediaPolicy) -> bytes:
    """Read an image file named by an absolute path or `file://` URL under the allowed folder."""
    root = policy.local_root
    if root is None:
        raise _rejected(
            param,
            "local image paths are not allowed on this server. Send the image as a data URL, or start the server "
            "with --allowed-local-media-path FOLDER (SPECVLM_ALLOWED_LOCAL_MEDIA_PATH).",
            "image_url_not_allowed",
        )
    path = _local_path(url, param)
    if "\x00" in path:
        raise _rejected(param, "the path contains a NUL character.")

    # The real path, resolved even where it does not exist, so that the error for a
    # path outside the folder does not reveal whether that file exists.
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise _rejected(
            param,
            "the file is outside the folder that --allowed-local-media-path allows (after resolving symlinks and '..').",
            "image_url_not_allowed",
        )

    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(real, flags)
    except FileNotFoundError as exc:
        raise _rejected(param, "the file was not found.", "image_not_found") from exc
    except OSError as exc:
        raise _rejected(param, f"the file could not be opened ({exc.strerror}).", "image_not_found") from exc

    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise _rejected(param, "the path is not a regular file.")
        _check_opened_under_root(descriptor, root, param)
        if info.st_size > policy.max_image_bytes:
            raise too_large(param, f"{info.st_size} bytes", policy.max_image_bytes)
        data = file.read(policy.max_image_bytes + 1)
    if len(data) > policy.max_image_bytes:
        raise too_large(param, f"over {policy.max_image_bytes} bytes", policy.max_image_bytes)
    return data


def _check_opened_under_root(descriptor: int, root: Path, param: str) -> None:
    """Check the real path of the opened file again, against a folder swapped for a symlink after the first check.

    NOTE: this needs /proc (Linux). Elsewhere only the check before opening applies.
    """
    link = f"/proc/self/fd/{descriptor}"
    if not os.path.exists(link):
        return
    if not Path(os.readlink(link)).is_relative_to(root):
        raise _rejected(
            param, "the file is outside the folder that --allowed-local-media-path allows.", "image_url_not_allowed"
        )
