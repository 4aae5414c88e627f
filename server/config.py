"""The server's one typed configuration.

Every setting is a field here with its default and bounds. The `specvlm` CLI flags and
the `SPECVLM_*` environment variables are derived from these fields, so a default lives
in exactly one place. Precedence: CLI flag, then environment variable, then default.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode
from pydantic_settings import BaseSettings, SettingsConfigDict

DType = Literal["auto", "float32", "bfloat16", "float16"]


class ServerConfig(BaseSettings):
    """Settings of `specvlm serve` (and the model settings of `specvlm generate`)."""

    model_config = SettingsConfigDict(env_prefix="SPECVLM_", extra="forbid")

    # Models
    model: str | None = Field(
        None, description="Target checkpoint: a local LLaVA folder. Default: the embedded demo model."
    )
    draft: str | None = Field(
        None,
        description="Draft checkpoint folder (config.json + model.safetensors). "
        "Default: the demo draft when serving the demo model, else no speculation.",
    )
    served_model_name: str | None = Field(
        None, description="Model id reported by /v1/models and accepted in requests. Default: the folder name."
    )
    dtype: DType = Field(
        "auto", description="Weights and activations dtype; auto picks bfloat16 where the device supports it."
    )
    device: str = Field("auto", description="torch device, e.g. cpu or cuda:0; auto picks cuda when available.")
    speculative: bool = Field(True, description="Decode with the draft; off runs the target alone.")

    # Draft tree (EAGLE-2 dynamic tree). depth counts draft levels exactly.
    tree_depth: int = Field(4, ge=1, le=16, description="Draft levels per step.")
    tree_top_k: int = Field(4, ge=1, le=32, description="Children kept per expanded node and frontier width.")
    tree_total_tokens: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Tree nodes verified per step, root included. Default: measured at start-up for this "
        "device and draft (1 turns drafting off).",
    )

    # Draft-side visual compressor; the target always reads every visual token.
    draft_compressor: Literal["auto", "none", "select", "weight", "concat"] = Field(
        "auto",
        description="What the draft gets of each image: auto uses the mode the draft was trained with (none when it "
        "has no compressor); none gives the draft every visual token.",
    )
    draft_visual_budget: int | None = Field(
        None,
        ge=0,
        description="Most visual tokens per image the draft may see; select mode picks the gate's best "
        "primitive within it. Default: no limit.",
    )

    # Capacity
    max_num_seqs: int = Field(4, ge=1, le=1024, description="KV cache slots: requests decoded at once.")
    max_model_len: int | None = Field(
        4096, ge=64, description="Context length in tokens (prompt + output); capped by the model's own limit."
    )
    max_waiting_requests: int = Field(64, ge=0, description="Requests waiting for a slot before new ones get 429.")

    # HTTP
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to bind.")
    api_key: str | None = Field(
        None, min_length=1, description="If set, requests need 'Authorization: Bearer KEY'."
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest decoded image (width * height) accepted, against decompression bombs."
    )
    max_images_per_request: int = Field(8, ge=0, description="Images accepted in one request.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    # Security and limits. The HTTP layer rejects a request over a limit with 400 or
    # 413 and an error that names the limit and the setting that raises it.
    health_requires_api_key: bool = Field(False, description="Require the API key on GET /health too.")
    metrics_requires_api_key: bool = Field(False, description="Require the API key on GET /metrics too.")
    allowed_media_domains: Annotated[list[str], NoDecode] = Field(
        [],
        description="Host names from which http(s) image URLs are fetched, comma-separated. "
        "'*.example.com' matches every subdomain of example.com. Hosts that resolve to loopback, private, "
        "link-local or other non-public addresses are rejected whatever this list says.",
    )
    allowed_local_media_path: str | None = Field(
        None,
        description="Folder whose files requests may name as images, by absolute path or file:// URL. "
        "Symlinks and '..' are resolved before the check. Default: no local files.",
    )
    media_fetch_timeout: float = Field(
        10.0, gt=0, le=600, description="Seconds allowed to connect to and download one http(s) image."
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Maximum size of one image file, in bytes, from any source."
    )
    max_stop_sequences: int = Field(4, ge=0, le=256, description="Maximum number of stop sequences in one request.")
    max_stop_sequence_length: int = Field(
        256, ge=1, le=65536, description="Maximum length of one stop sequence, in characters."
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="After SIGTERM or SIGINT, seconds that running requests get to finish before they are "
        "aborted and the server exits.",
    )

    @field_validator("allowed_media_domains", mode="before")
    @classmethod
    def _split_domains(cls, value: object) -> object:
        """Accept 'a.com,b.com' from a flag or an environment variable as well as a list."""
        if isinstance(value, str):
            return [item for item in value.split(",") if item.strip()]
        return value

    @field_validator("allowed_media_domains")
    @classmethod
    def _normalize_domains(cls, domains: list[str]) -> list[str]:
        return [_normalize_domain(domain) for domain in domains]

    @field_validator("allowed_local_media_path")
    @classmethod
    def _resolve_media_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        folder = Path(value).expanduser().resolve()
        if not folder.is_dir():
            raise ValueError(f"{value!r} is not an existing folder. Create it or point the setting to a folder.")
        return str(folder)


def _normalize_domain(domain: str) -> str:
    """Return an `allowed_media_domains` entry in lower-case ASCII (IDNA), or raise ValueError.

    An IP address entry is kept as written, without brackets for IPv6.
    """
    name = domain.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    bare = name.removeprefix("*.")
    if not bare or any(char in bare for char in "/:@?#[]* \t"):
        raise ValueError(
            f"{domain!r} is not a host name. List bare host names such as images.example.com or *.example.com, "
            "without scheme, port or path."
        )
    try:
        ascii_name = bare.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise ValueError(f"{domain!r} is not a valid host name ({error}).") from error
    return ascii_name if name == bare else "*." + ascii_name
