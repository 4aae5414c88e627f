"""Resolve the configured target and draft checkpoints and load them."""

from __future__ import annotations

import logging
from pathlib import Path

from draft_models.eagle import EagleDraft, load_draft
from server.config import ServerConfig
from server.engine.target import TargetModel

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "specvlm-demo"
DEMO_DESCRIPTION = "demo VLM: SmolLM2-135M-Instruct with an untrained vision tower, so answers do not reflect the image"


def resolve_paths(config: ServerConfig) -> tuple[Path, Path | None, bool]:
    """Return (target folder, draft folder or None, whether this is the demo model)."""
    if config.model is None:
        from server.demo_model import ensure_demo_model

        paths = ensure_demo_model()
        draft = Path(config.draft) if config.draft else paths.draft
        return paths.target, draft, True
    target = Path(config.model)
    if not target.is_dir():
        raise FileNotFoundError(
            f"model {config.model!r} is not a local folder; pass a Hugging Face checkpoint folder "
            "(download it first, e.g. with `huggingface-cli download`)"
        )
    return target, Path(config.draft) if config.draft else None, False


def load_models(config: ServerConfig) -> tuple[TargetModel, EagleDraft | None, str, str]:
    """Load the target and, when speculation is on, its draft; return them with name and description."""
    target_path, draft_path, is_demo = resolve_paths(config)
    target = TargetModel(target_path, dtype=config.dtype, device=config.device)
    draft = None
    if config.speculative and draft_path is not None:
        decoder = target.decoder
        draft = load_draft(draft_path, decoder.embed_tokens, decoder.lm_head, target.embedding_fingerprint,
                           target.dtype, target.device)
        logger.info("loaded draft %s", draft_path)
    elif config.speculative:
        logger.warning("no draft given (--draft); decoding with the target alone")
    name = config.served_model_name or (DEMO_MODEL_NAME if is_demo else target_path.name)
    description = DEMO_DESCRIPTION if is_demo else f"{target.text_config.model_type} model from {target_path}"
    if is_demo:
        logger.warning("serving the %s", DEMO_DESCRIPTION)
    return target, draft, name, description
