"""Building blocks of a training run: the trainable draft, the optimizer and the LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from compressors import CompressorConfig
from draft_models.eagle import EagleDraft, load_draft, new_draft_for
from draft_models.llama_layers import DecoderLayer, rope_inv_freq

DRAFT_DTYPE = torch.float32  # the draft trains in float32 whatever the teacher's dtype
ADAM_BETAS = (0.9, 0.95)


def frozen_output_modules(target, dtype: torch.dtype) -> tuple[nn.Embedding, nn.Linear]:
    """Return the target's embedding and LM head in `dtype`, frozen; shared when already in it."""
    embed, head = target.decoder.embed_tokens, target.decoder.lm_head
    if embed.weight.dtype == dtype:
        return embed, head
    vocab_size, hidden = embed.weight.shape
    embed_copy = nn.Embedding.from_pretrained(embed.weight.detach().to(dtype), freeze=True)
    head_copy = nn.Linear(hidden, vocab_size, bias=False, device=embed.weight.device, dtype=dtype)
    if head.weight is embed.weight:
        head_copy.weight = embed_copy.weight
    else:
        head_copy.weight = nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
    head_copy.requires_grad_(False)
    return embed_copy, head_copy


def copy_target_layer(draft: EagleDraft, layer: DecoderLayer) -> None:
    """Initialise the draft's decoder layer from a target layer of the same shape.

    With partial alignment the MLP's down projection outputs twice the width, so both
    halves start as the target's down projection.
    """
    state = {name: tensor.detach().to(DRAFT_DTYPE) for name, tensor in layer.state_dict().items()}
    if draft.config.partial_alignment:
        for name in ("mlp.down_proj.weight", "mlp.down_proj.bias"):
            if name in state:
                state[name] = torch.cat((state[name], state[name]), dim=0)
    draft.layer.load_state_dict(state)


def build_draft(config, target, device: torch.device) -> EagleDraft:
    """Return the draft to train, in float32 on `device`, bound to frozen float32 output modules.

    `config` is a `TrainingConfig`: the draft comes from `--init-from`, else it is new, with
    its layer copied from the target's last layer when `--init-layer last`.
    """
    embed, head = frozen_output_modules(target, DRAFT_DTYPE)
    if config.init_from is not None:
        draft = load_draft(config.init_from, embed, head, target.embedding_fingerprint, DRAFT_DTYPE, device)
        _set_compressor(draft, config)
        return draft.train()
    feature_sampling, partial_alignment = config.draft_variant()
    draft = new_draft_for(
        target.decoder.spec, embed.weight.shape[0], target.path.name, target.embedding_fingerprint,
        seed=config.seed, feature_sampling=feature_sampling, partial_alignment=partial_alignment,
    )
    if config.init_layer == "last":
        copy_target_layer(draft, target.decoder.layers[-1])
    draft = draft.to(device=device, dtype=DRAFT_DTYPE).train()
    draft.inv_freq = rope_inv_freq(draft.config.layer).to(device)
    draft.bind_target(embed, head)
    _set_compressor(draft, config)
    return draft


def _set_compressor(draft: EagleDraft, config) -> None:
    """Attach a new compressor for `--compressor`, or switch the mode of the one the draft has."""
    if config.compressor is None:
        return
    if draft.compressor is None:
        draft.attach_compressor(CompressorConfig(mode=config.compressor, cost_weight=config.compressor_cost_weight))
    else:
        draft.compressor.config.mode = config.compressor
        draft.compressor.config.cost_weight = config.compressor_cost_weight
        draft.config.compressor = draft.compressor.config.to_dict()


def build_optimizer(draft: EagleDraft, config) -> torch.optim.AdamW:
    return torch.optim.AdamW(draft.parameters(), lr=config.lr, betas=ADAM_BETAS, weight_decay=config.weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Return the learning-rate multiplier for optimizer step `step` (0-based).

    Linear warm-up to 1 over `warmup_steps`, then cosine or linear decay to 0 at
    `total_steps`, or constant.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer, config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, schedule = config.warmup_steps, config.schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, schedule))


def clip_gradients(draft: EagleDraft, clip: str, threshold: float) -> None:
    if clip == "value":
        torch.nn.utils.clip_grad_value_(draft.parameters(), threshold)
    elif clip == "norm":
        torch.nn.utils.clip_grad_norm_(draft.parameters(), threshold)
