"""The server's one typed configuration.

Every setting is a field here with its default and bounds. The `specvlm` CLI flags and
the `SPECVLM_*` environment variables are derived from these fields, so a default lives
in exactly one place. Precedence: CLI flag, then environment variable, then default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
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
    api_key: str | None = Field(None, description="If set, requests need 'Authorization: Bearer KEY'.")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body accepted, in bytes.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest decoded image (width * height) accepted, against decompression bombs."
    )
    max_images_per_request: int = Field(8, ge=0, description="Images accepted in one request.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
