"""EAGLE-style draft head with SpecVLM's input norm, and its checkpoint format.

At position i the draft reads `fc(concat(embed(t[i+1]), f[i]))`. Here `f[i]` is the
target's feature (final-norm hidden state) at i and `embed` is the target's own token
embedding. It runs one decoder layer of the target's family, with the input RMSNorm that
SpecVLM adds to EAGLE's layer, and predicts `f[i+1]`. Logits come from the target's LM
head. Embedding and LM head are borrowed from the target at load time, never copied.

Two optional changes from FSPAD, recorded in the checkpoint (variant "fspad" has both):
- feature sampling: the fusion becomes `h0 = fc(concat(e, f))`,
  `h = h0 + W_down(SiLU(W_gate e) * W_up RMSNorm(h0))`, so the token gates a SwiGLU over
  the fused feature;
- partial alignment: the layer's MLP outputs 2H. The first half feeds the LM head (and is
  trained by cross-entropy only), the second half is the predicted feature (trained by
  the feature loss only) and is what drafting feeds back as the next input feature.

A draft may carry a visual compressor (`compressors.VisualCompressor`), recorded under
"compressor" in its config and under `compressor.` in its weights. It shortens each
image's rows of the fused input before the decoder layer, so the draft runs over its own,
shorter sequence with contiguous positions.

A checkpoint is a folder with `config.json` and `model.safetensors`. The config names
the target it was trained for, including a fingerprint of the target's embedding, so a
draft cannot be paired with the wrong target by accident.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compressors import CompressorConfig, VisualCompressor
from draft_models.llama_layers import (
    MLP,
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

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def embedding_fingerprint(embedding: torch.Tensor) -> str:
    """Return a short hash of an embedding matrix, independent of the dtype it was loaded in."""
    data = embedding.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class EagleConfig:
    """Contents of a draft checkpoint's config.json."""

    layer: LayerSpec
    vocab_size: int
    target_name: str
    target_fingerprint: str
    architecture: str = "eagle"
    feature_sampling: bool = False
    partial_alignment: bool = False
    compressor: dict | None = None  # a CompressorConfig as a dict; None: the draft reads every visual token
    extra: dict = field(default_factory=dict)

    @property
    def variant(self) -> str:
        if self.feature_sampling and self.partial_alignment:
            return "fspad"
        if self.feature_sampling or self.partial_alignment:
            return "eagle+" + ("feature_sampling" if self.feature_sampling else "partial_alignment")
        return "eagle"

    def to_json(self) -> str:
        return json.dumps(
            {
                "architecture": self.architecture,
                "variant": self.variant,
                "feature_sampling": self.feature_sampling,
                "partial_alignment": self.partial_alignment,
                "layer": self.layer.to_dict(),
                "vocab_size": self.vocab_size,
                "target": {"name": self.target_name, "embedding_fingerprint": self.target_fingerprint},
                **({"compressor": self.compressor} if self.compressor else {}),
                **self.extra,
            },
            indent=2,
        )

    @classmethod
    def from_file(cls, path: Path) -> "EagleConfig":
        data = json.loads(path.read_text())
        known = {
            "architecture", "variant", "feature_sampling", "partial_alignment", "layer", "vocab_size", "target", "compressor",
        }
        return cls(
            layer=LayerSpec(**data["layer"]),
            vocab_size=data["vocab_size"],
            target_name=data["target"]["name"],
            target_fingerprint=data["target"]["embedding_fingerprint"],
            architecture=data.get("architecture", "eagle"),
            feature_sampling=bool(data.get("feature_sampling", False)),
            partial_alignment=bool(data.get("partial_alignment", False)),
            compressor=data.get("compressor"),
            extra={k: v for k, v in data.items() if k not in known},
        )


class FeatureSampling(nn.Module):
    """FSPAD's token-gated SwiGLU over the fused feature, added to it as a residual."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        hidden = spec.hidden_size
        self.norm = RMSNorm(hidden, spec.rms_norm_eps)
        self.gate_proj = nn.Linear(hidden, hidden, bias=False)
        self.up_proj = nn.Linear(hidden, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, fused: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        gate = torch.nn.functional.silu(self.gate_proj(token_embeds))
        return fused + self.down_proj(gate * self.up_proj(self.norm(fused)))


class PartialAlignmentLayer(DecoderLayer):
    """A decoder layer whose MLP outputs [LM-head half, feature half], each with its own residual."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.mlp = MLP(spec, output_size=2 * spec.hidden_size)

    def forward(self, x, rotary, cache: KVCache, layer: int, mask: AttentionMask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, cache, layer, mask)
        return torch.cat((x, x), dim=-1) + self.mlp(self.post_attention_layernorm(x))


class EagleDraft(nn.Module):
    """One fused-input decoder layer that predicts the target's next feature.

    `forward` returns the draft's raw output: [..., hidden], or [..., 2 * hidden] with
    partial alignment. Read it through `logits` and `next_feature`, never directly.
    """

    def __init__(self, config: EagleConfig):
        super().__init__()
        self.config = config
        hidden = config.layer.hidden_size
        self.hidden_size = hidden
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.feature_sampling = FeatureSampling(config.layer) if config.feature_sampling else None
        self.layer = PartialAlignmentLayer(config.layer) if config.partial_alignment else DecoderLayer(config.layer)
        self.compressor = None
        if config.compressor:
            self.compressor = VisualCompressor(CompressorConfig.from_dict(config.compressor), hidden)
        self.register_buffer("inv_freq", rope_inv_freq(config.layer), persistent=False)
        # Borrowed from the target; kept out of this module's parameters and state dict.
        self._target_modules: tuple[nn.Embedding, nn.Linear] | None = None

    def bind_target(self, embed_tokens: nn.Embedding, lm_head: nn.Linear) -> None:
        self._target_modules = (embed_tokens, lm_head)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._target_modules[0]

    @property
    def lm_head(self) -> nn.Linear:
        return self._target_modules[1]

    def make_cache(self, num_slots: int, max_len: int) -> KVCache:
        spec = self.config.layer
        weight = self.fc.weight
        return KVCache(1, num_slots, spec.num_key_value_heads, max_len, spec.head_dim, weight.dtype, weight.device)

    def attach_compressor(self, config: CompressorConfig) -> None:
        """Add a new (untrained) visual compressor, recorded in the checkpoint's config."""
        weight = self.fc.weight
        self.compressor = VisualCompressor(config, self.hidden_size).to(weight.device, weight.dtype)
        self.config.compressor = config.to_dict()

    def forward(
        self,
        input_embeds: torch.Tensor,  # [batch, num_new, hidden] embedding of the token after each position
        features: torch.Tensor,  # [batch, num_new, hidden] target (or drafted) feature at each position
        positions: torch.Tensor,  # [batch, num_new]
        cache: KVCache,
        mask: AttentionMask,
    ) -> torch.Tensor:
        """Return the raw draft output at each position (see the class docstring)."""
        return self.decode_fused(self.fuse(input_embeds, features), positions, cache, mask)

    def fuse(self, input_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Return the layer's input [..., hidden] from token embeddings and features (what the compressor shortens)."""
        fused = self.fc(torch.cat((input_embeds, features.to(input_embeds.dtype)), dim=-1))
        if self.feature_sampling is not None:
            fused = self.feature_sampling(fused, input_embeds)
        return fused

    def decode_fused(self, fused: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask: AttentionMask) -> torch.Tensor:
        rotary = rotary_tables(self.inv_freq, positions, fused.dtype)
        return self.layer(fused, rotary, cache, 0, mask)

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """Return float32 next-token logits from the draft output."""
        return self.lm_head(output[..., : self.hidden_size]).float()

    def next_feature(self, output: torch.Tensor) -> torch.Tensor:
        """Return the predicted next feature, which drafting feeds back as the next input."""
        return output[..., -self.hidden_size :]


def save_draft(draft: EagleDraft, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in draft.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(draft.config.to_json() + "\n")


def load_draft(
    folder: str | Path,
    embed_tokens: nn.Embedding,
    lm_head: nn.Linear,
    target_fingerprint: str,
    dtype: torch.dtype,
    device: torch.device,
) -> EagleDraft:
    """Load a draft checkpoint for a target whose embedding has `target_fingerprint`.

    Raises ValueError when the draft was made for another target.
    """
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).exists():
            raise FileNotFoundError(f"draft folder {folder} has no {name}; a draft checkpoint is config.json + model.safetensors")
    config = EagleConfig.from_file(folder / CONFIG_NAME)
    if config.architecture != "eagle":
        raise ValueError(f"draft architecture {config.architecture!r} in {folder} is not supported; expected 'eagle'")
    hidden = embed_tokens.weight.shape[1]
    if config.layer.hidden_size != hidden or config.vocab_size != embed_tokens.weight.shape[0]:
        raise ValueError(
            f"draft {folder} was made for a target with hidden size {config.layer.hidden_size} and vocabulary "
            f"{config.vocab_size} ({config.target_name}), but the served target has {hidden} and "
            f"{embed_tokens.weight.shape[0]}; pass the draft trained for this target"
        )
    if config.target_fingerprint != target_fingerprint:
        raise ValueError(
            f"draft {folder} was made for target {config.target_name!r} (embedding fingerprint "
            f"{config.target_fingerprint}), but the served target's fingerprint is {target_fingerprint}; "
            "pass the draft trained for this target"
        )
    draft = EagleDraft(config)
    draft.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    draft = draft.to(device=device, dtype=dtype).eval()
    draft.inv_freq = rope_inv_freq(config.layer).to(device)
    draft.bind_target(embed_tokens, lm_head)
    return draft


def new_draft_for(
    layer: LayerSpec,
    vocab_size: int,
    target_name: str,
    fingerprint: str,
    seed: int = 0,
    feature_sampling: bool = False,
    partial_alignment: bool = False,
) -> EagleDraft:
    """Create an untrained draft with a deterministic initialisation (normal, std 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    config = EagleConfig(
        layer, vocab_size, target_name, fingerprint,
        feature_sampling=feature_sampling, partial_alignment=partial_alignment,
    )
    draft = EagleDraft(config)
    for name, parameter in draft.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return draft


def write_initial_draft(
    target_path: str | Path,
    draft_path: str | Path,
    seed: int = 0,
    feature_sampling: bool = False,
    partial_alignment: bool = False,
    compressor: CompressorConfig | None = None,
) -> None:
    """Write an untrained draft checkpoint shaped for the target at `target_path`, with an optional compressor."""
    from transformers import AutoConfig

    target_path = Path(target_path)
    config = AutoConfig.from_pretrained(target_path)
    text_config = getattr(config, "text_config", config)
    tensors = read_safetensors(target_path)
    embedding = next(value for key, value in tensors.items() if key.endswith("embed_tokens.weight"))
    draft = new_draft_for(
        layer_spec_for(text_config), embedding.shape[0], target_path.name, embedding_fingerprint(embedding), seed,
        feature_sampling=feature_sampling, partial_alignment=partial_alignment,
    )
    if compressor is not None:
        torch.manual_seed(seed)
        draft.attach_compressor(compressor)
    save_draft(draft, draft_path)
    logger.info("wrote an untrained draft for %s to %s", target_path, draft_path)
