"""The target's language model: a compact Llama-family decoder over a slot KV cache.

Weights come from a Hugging Face checkpoint (safetensors) by parameter-name mapping; the
architecture is picked from `text_config.model_type` through `ARCHITECTURES`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from draft_models.llama_layers import (
    AttentionMask,
    DecoderLayer,
    KVCache,
    LayerSpec,
    RMSNorm,
    layer_spec_for,
    read_safetensors,
    rope_inv_freq,
    rotary_tables,
)

logger = logging.getLogger(__name__)


# Prefixes of the language model's weights in known checkpoint layouts, tried in order:
# transformers 5 LLaVA, transformers 4 LLaVA, a plain causal LM.
_DECODER_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


class Decoder(nn.Module):
    """Token embedding, decoder layers, final norm and LM head of the target."""

    def __init__(self, spec: LayerSpec, num_layers: int, vocab_size: int, tie_word_embeddings: bool):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)

    def make_cache(self, num_slots: int, max_len: int) -> KVCache:
        param = self.embed_tokens.weight
        return KVCache(
            len(self.layers), num_slots, self.spec.num_key_value_heads, max_len, self.spec.head_dim, param.dtype, param.device
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [batch, num_new, hidden]
        positions: torch.Tensor,  # [batch, num_new]
        cache: KVCache,
        mask: AttentionMask,
    ) -> torch.Tensor:
        """Run the layers and return the features (final-norm outputs) [batch, num_new, hidden]."""
        rotary = rotary_tables(self.inv_freq, positions, inputs_embeds.dtype)
        hidden = inputs_embeds
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rotary, cache, index, mask)
        return self.norm(hidden)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Return float32 logits for features [..., hidden]."""
        return self.lm_head(features).float()


def load_decoder(text_config, tensors: dict[str, torch.Tensor], tie_word_embeddings: bool, dtype, device) -> Decoder:
    """Build the decoder and fill it from checkpoint tensors (consumed from `tensors`)."""
    spec = layer_spec_for(text_config)
    prefix = next((p for p in _DECODER_PREFIXES if f"{p}embed_tokens.weight" in tensors), None)
    if prefix is None:
        raise ValueError("checkpoint has no language model embedding (looked for " + ", ".join(
            f"{p}embed_tokens.weight" for p in _DECODER_PREFIXES) + ")")
    state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    head_key = next((k for k in _LM_HEAD_KEYS if k in tensors), None)
    tie = tie_word_embeddings or head_key is None
    if not tie:
        state["lm_head.weight"] = tensors[head_key]

    with torch.device("meta"):
        decoder = Decoder(spec, text_config.num_hidden_layers, text_config.vocab_size, tie)
    missing, unexpected = decoder.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if not (tie and name == "lm_head.weight")]
    if missing:
        raise ValueError(f"checkpoint is missing decoder weights: {missing[:5]}")
    if unexpected:
        logger.warning("ignoring %d unexpected decoder weights, e.g. %s", len(unexpected), unexpected[:3])
    if tie:
        decoder.lm_head.weight = decoder.embed_tokens.weight
    decoder.inv_freq = rope_inv_freq(spec)  # replaces the meta-device buffer
    decoder = decoder.to(device=device, dtype=dtype).eval()
    decoder.inv_freq = rope_inv_freq(spec).to(device)  # kept in float32, as Hugging Face does
    return decoder
