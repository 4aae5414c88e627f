"""Llama-family transformer blocks with an explicit, slot-based KV cache.

Shared by the target decoder (`server.engine.decoder`) and the draft heads, so that a
draft layer computes exactly what a target layer of the same shape would. Covers Llama,
Vicuna, Mistral, SmolLM2 and Qwen2 (bias on q/k/v only).

Attention here never builds a causal mask itself: the caller passes one boolean mask per
forward (`AttentionMask`), which is how tree verification, prefill and draft expansion
share one code path. The numerics follow Hugging Face's Llama (fp32 RMSNorm statistics,
fp32 rotary tables cast to the activation dtype) so that logits match its reference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LayerSpec:
    """Shape and numerics of one decoder layer, read from a Hugging Face text config."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    def to_dict(self) -> dict:
        return asdict(self)


def _llama_spec(text_config) -> LayerSpec:
    heads = text_config.num_attention_heads
    return LayerSpec(
        hidden_size=text_config.hidden_size,
        intermediate_size=text_config.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
        rms_norm_eps=text_config.rms_norm_eps,
        max_position_embeddings=text_config.max_position_embeddings,
        rope_parameters=dict(text_config.rope_parameters),
        qkv_bias=bool(getattr(text_config, "attention_bias", False)),
        o_bias=bool(getattr(text_config, "attention_bias", False)),
        mlp_bias=bool(getattr(text_config, "mlp_bias", False)),
        hidden_act=text_config.hidden_act,
    )


def _qwen2_spec(text_config) -> LayerSpec:
    spec = _llama_spec(text_config)
    spec.qkv_bias, spec.o_bias = True, False
    return spec


# text_config.model_type -> function building the layer spec. Mistral uses Llama's
# layers; its sliding window is larger than the contexts served here.
ARCHITECTURES = {"llama": _llama_spec, "mistral": _llama_spec, "qwen2": _qwen2_spec}

def layer_spec_for(text_config) -> LayerSpec:
    model_type = text_config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported language model type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type](text_config)


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint folder (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [path.name for path in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}; the checkpoint must be saved with safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def rope_inv_freq(spec: LayerSpec) -> torch.Tensor:
    """Return the rotary inverse frequencies [head_dim // 2] for the spec's RoPE type."""
    rope_type = spec.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        base = float(spec.rope_parameters["rope_theta"])
        exponents = torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim
        return 1.0 / (base**exponents)
    if rope_type == "dynamic":
        raise ValueError("RoPE type 'dynamic' depends on the sequence length and is not supported")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown RoPE type {rope_type!r}; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    config = LlamaConfig(
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=dict(spec.rope_parameters),
    )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    if scaling != 1.0:
        # NOTE: attention scaling of YaRN-like RoPE is not applied; such models load but drift.
        raise ValueError(f"RoPE type {rope_type!r} with attention scaling {scaling} is not supported yet")
    return inv_freq


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


def rotary_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """Return cos and sin [batch, 1, seq, head_dim] for integer positions [batch, seq]."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


@dataclass
class AttentionMask:
    """Where one forward writes its keys and what each query may see.

    The new tokens of batch row b are written to cache positions
    `write_start[b] + [0, num_new)`. Query t of row b attends to every key below
    `prefix_len[b]` (committed context) and, in the region that starts at `prefix_len[b]`
    and is `region_mask.shape[-1]` long, the keys where `region_mask[b, t]` is True.
    For prefill: prefix 0, region = causal mask. For verify: prefix = committed length,
    region = the tree's ancestor mask.
    """

    slots: torch.Tensor  # [batch] cache row of each batch row
    write_start: torch.Tensor  # [batch]
    prefix_len: torch.Tensor  # [batch]
    region_mask: torch.Tensor  # [batch, num_new, region_len] bool
    key_len: int = 0  # keys read per row: max(prefix_len) + region_len
    dense: torch.Tensor | None = None  # [batch, 1, num_new, key_len] bool, built once
    write_positions: torch.Tensor | None = None  # [batch, num_new] cache positions written

    @classmethod
    def build(cls, slots, write_start, prefix_len, region_mask) -> "AttentionMask":
        batch, num_new, region_len = region_mask.shape
        key_len = int(prefix_len.max().item()) + region_len
        keys = torch.arange(key_len, device=region_mask.device)
        dense = keys[None, None, :] < prefix_len[:, None, None]  # [batch, 1, key_len]
        dense = dense.expand(batch, num_new, key_len).clone()
        region_index = prefix_len[:, None] + torch.arange(region_len, device=region_mask.device)
        region_index = region_index[:, None, :].expand(batch, num_new, region_len)
        dense.scatter_(2, region_index, region_mask)
        positions = write_start[:, None] + torch.arange(num_new, device=region_mask.device)
        return cls(slots, write_start, prefix_len, region_mask, key_len, dense[:, None], positions)

    @staticmethod
    def causal(num_new: int, device) -> torch.Tensor:
        return torch.ones(num_new, num_new, dtype=torch.bool, device=device).tril()


class KVCache:
    """Preallocated keys and values for `num_slots` sequences of up to `max_len` tokens.

    Each layer has `[num_slots, kv_heads, max_len, head_dim]` tensors. Lengths are kept
    by the caller (the scheduler), so the cache is only storage plus a compaction helper.
    """

    def __init__(self, num_layers, num_slots, num_kv_heads, max_len, head_dim, dtype, device):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    def write(self, layer: int, mask: AttentionMask, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [batch, kv_heads, num_new, head_dim] at the mask's write positions."""
        rows = mask.slots[:, None].expand_as(mask.write_positions)
        self.keys[layer][rows, :, mask.write_positions] = k.transpose(1, 2)
        self.values[layer][rows, :, mask.write_positions] = v.transpose(1, 2)

    def read(self, layer: int, mask: AttentionMask) -> tuple[torch.Tensor, torch.Tensor]:
        """Return keys and values [batch, kv_heads, key_len, head_dim] of the mask's slots."""
        return (
            self.keys[layer][mask.slots, :, : mask.key_len],
            self.values[layer][mask.slots, :, : mask.key_len],
        )

    def move(self, slots: torch.Tensor, source: torch.Tensor, target_start: torch.Tensor) -> None:
        """Copy entries at positions source [batch, n] to target_start[b] + [0, n) in every layer.

        Used after verify to make the accepted path contiguous. Source positions must be
        ascending and not below their targets, which holds for a path read from a tree
        whose nodes are stored parent before child.
        """
        count = source.shape[1]
        target = target_start[:, None] + torch.arange(count, device=source.device)
        rows = slots[:, None].expand_as(source)
        for cache in (*self.keys, *self.values):
            cache[rows, :, target] = cache[rows, :, source]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class Attention(nn.Module):
    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, self.num_heads * self.head_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, spec.hidden_size, bias=spec.o_bias)

    def forward(self, x, rotary, cache: KVCache, layer: int, mask: AttentionMask) -> torch.Tensor:
        batch, num_new, _ = x.shape
        q = self.q_proj(x).view(batch, num_new, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, num_new, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        cache.write(layer, mask, k, v)
        keys, values = cache.read(layer, mask)  # [batch, kv_heads, key_len, head_dim]
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            keys = keys.repeat_interleave(repeat, dim=1)
            values = values.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.dense)
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_new, -1))


class MLP(nn.Module):
    def __init__(self, spec: LayerSpec, output_size: int | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, output_size or spec.hidden_size, bias=spec.mlp_bias)
        if spec.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {spec.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; parameter names match Hugging Face's Llama layers."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, rotary, cache: KVCache, layer: int, mask: AttentionMask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
