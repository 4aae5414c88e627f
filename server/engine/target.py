"""The target model: weights, processor, vision encode and input embeddings.

A checkpoint folder is either a LLaVA checkpoint (`LlavaForConditionalGeneration`, with
a processor) or a plain Llama-family causal LM (text only, tokenizer only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig

from draft_models.eagle import embedding_fingerprint
from draft_models.llama_layers import read_safetensors
from server.engine.decoder import load_decoder
from server.engine.vision import VisionEncoder

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map a dtype setting to torch; `auto` is bfloat16 where the device computes it natively."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cpu_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if (cpu_bf16 or amx) else torch.float32


class TargetModel:
    """Everything of the served model that the engine thread needs."""

    def __init__(self, path: str | Path, dtype: str = "auto", device: str = "auto"):
        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(
                f"model folder {self.path} has no config.json; pass a local Hugging Face checkpoint folder"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = AutoConfig.from_pretrained(self.path)
        self.is_multimodal = hasattr(self.config, "vision_config")
        self.text_config = self.config.text_config if self.is_multimodal else self.config

        tensors = read_safetensors(self.path)
        tie = bool(getattr(self.config, "tie_word_embeddings", False) or getattr(self.text_config, "tie_word_embeddings", False))
        self.decoder = load_decoder(self.text_config, tensors, tie, self.dtype, self.device)
        self.vision = None
        self.processor = None
        if self.is_multimodal:
            self.vision = VisionEncoder(self.config, tensors).to(self.device, self.dtype).eval()
            self.processor = AutoProcessor.from_pretrained(self.path)
            self.tokenizer = self.processor.tokenizer
            self.image_token_id = self.config.image_token_id
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.image_token_id = None
        embedding_key = next(key for key in tensors if key.endswith("embed_tokens.weight"))
        self.embedding_fingerprint = embedding_fingerprint(tensors[embedding_key])
        del tensors
        self.eos_token_ids = self._eos_token_ids()
        self.max_position_embeddings = self.text_config.max_position_embeddings
        logger.info(
            "loaded target %s (%s, %d layers, %s on %s)",
            self.path, self.text_config.model_type, len(self.decoder.layers), self.dtype, self.device,
        )

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        try:
            eos = GenerationConfig.from_pretrained(self.path).eos_token_id
        except OSError:
            eos = None
        for value in (eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids

    @property
    def hidden_size(self) -> int:
        return self.decoder.spec.hidden_size

    @torch.inference_mode()
    def embed_prompt(self, token_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Return input embeddings [num_tokens, hidden] with visual tokens at the image placeholders."""
        token_ids = token_ids.to(self.device)
        is_visual = token_ids == self.image_token_id if self.image_token_id is not None else None
        safe_ids = token_ids.masked_fill(is_visual, 0) if is_visual is not None else token_ids
        embeds = self.decoder.embed_tokens(safe_ids)
        if pixel_values is None or self.vision is None:
            return embeds
        visual = self.vision(pixel_values).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if int(is_visual.sum()) != visual.shape[0]:
            raise ValueError(
                f"prompt has {int(is_visual.sum())} image placeholder tokens but the images give {visual.shape[0]} visual tokens"
            )
        embeds = embeds.clone()
        embeds[is_visual] = visual
        return embeds
